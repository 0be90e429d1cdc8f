"""The residual merge between a block's attention and its MLP leaves other hooks on the MLP branch intact."""

import pytest
import torch

import quickmerge


def layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The block list (its path changes across transformers releases)."""
    return next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))


def timm_vit():
    pytest.importorskip("timm")
    from .test_timm_vit import tiny_vit

    model = tiny_vit(True, init_values=0.1)
    return model, torch.randn(2, 1, 16, 16), [b.drop_path2 for b in model.blocks]


def hf_clip():
    pytest.importorskip("transformers")
    from .test_hf_clip import tiny

    model = tiny("CLIPVisionModel", "sdpa")
    return model, torch.randn(2, 3, 16, 16), [layer.mlp for layer in layers(model)]


def hf_dinov2():
    pytest.importorskip("transformers")
    from .test_hf_vit import tiny

    model = tiny("Dinov2Model", "sdpa")
    return model, torch.randn(2, 1, 16, 16), [layer.layer_scale2 for layer in layers(model)]


def hf_vit():
    pytest.importorskip("transformers")
    from quickmerge.vision.adapters.hf_vit import _residual_parts

    from .test_hf_vit import tiny

    model = tiny("ViTModel", "sdpa")
    parts = [_residual_parts(layer) for layer in layers(model)]
    if None in parts:
        pytest.skip("this transformers' ViTLayer adds its residual inside layer.output (no branch hook)")
    return model, torch.randn(2, 1, 16, 16), [branch for _norm, branch in parts]


def openclip():
    pytest.importorskip("open_clip")
    from .test_openclip_vit import tiny

    model = tiny(ls_init_value=0.1)
    return model, torch.randn(2, 3, 16, 16), [b.ls_2 for b in model.transformer.resblocks]


def torchvision_vit():
    pytest.importorskip("torchvision")
    from .test_torchvision_vit import tiny

    model = tiny()
    return model, torch.randn(2, 3, 16, 16), [b.mlp for b in model.encoder.layers]


def output(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


@pytest.mark.parametrize("build", [timm_vit, hf_clip, hf_dinov2, hf_vit, openclip, torchvision_vit])
@torch.no_grad()
def test_a_hook_registered_on_the_mlp_branch_after_patching_sees_its_output(build):
    model, x, branches = build()
    before: list[torch.Tensor] = []
    for branch in branches:
        branch.register_forward_hook(lambda _m, _a, out: before.append(out))
    handle = quickmerge.patch(model, r=8)
    expected = output(model(x))
    seen_first = list(before)
    after: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda _m, _a, out: after.append(out)) for b in branches]
    before.clear()
    got = output(model(x))
    assert torch.equal(got, expected)  # an observer changes nothing
    assert [t.shape for t in after] == [t.shape for t in before] == [t.shape for t in seen_first]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))  # the output, not the zero
    assert min(t.shape[1] for t in after) < handle.tokens_per_layer[0]  # merged before the MLP
    for h in handles:
        h.remove()
    handle.remove()
