"""quickmerge.patch on torchvision's VisionTransformer: exactness, restore, training, the refusals, and the shipped
reference ViT converted from timm merging as timm's does (its nn.MultiheadAttention hook: test_multihead.py)."""

import pytest
import torch

import quickmerge

from ...conftest import alive_after_call

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

tv_vit = pytest.importorskip("torchvision.models.vision_transformer")


def with_random_head(model: torch.nn.Module) -> torch.nn.Module:
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: every output would be 0
    return model.eval()


def tiny(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return with_random_head(tv_vit.VisionTransformer(image_size=16, patch_size=2, num_layers=3, num_heads=4,
                                                     hidden_dim=32, mlp_dim=64, num_classes=5, **extra))


def test_r0_is_exact_and_unpatch_restores():
    model, x = tiny(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        handle = quickmerge.patch(model, r=0)
        assert torch.equal(model(x), ref)
        handle.r = 12
        out = model(x)
        assert handle.tokens_per_layer == [65, 53, 41]
        assert not torch.allclose(out, ref, atol=1e-4)
    quickmerge.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_patched_model_trains_through_its_merges():
    model, x = tiny().train(), torch.randn(4, 3, 16, 16)
    with quickmerge.patch(model, r=8, temperature=1.0) as handle:
        model(x).logsumexp(-1).sum().backward()
        assert handle.tokens_per_layer == [65, 57, 49]
    assert model.conv_proj.weight.grad is not None and model.conv_proj.weight.grad.abs().sum() > 0


def test_blocks_it_cannot_hook_are_refused_untouched():
    model = tiny()

    class OwnAttention(torch.nn.Module):  # a user's replacement: no in_proj weights to recompute keys from
        def forward(self, q, k, v, need_weights=False):
            return q, None

    model.encoder.layers[1].self_attention = OwnAttention()
    with pytest.raises(TypeError, match=r"1 of 3 encoder layers.*not supported"):
        quickmerge.patch(model, r=4)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_readme_s_vit_b_16_patches_as_said():
    """The README's snippet on torchvision's ViT-B/16 architecture, that of its SWAG linear-probe weights at 224
    pixels, randomly initialised (no weights can be downloaded here)."""
    from torchvision.models import vit_b_16

    model, images = with_random_head(vit_b_16()), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model(images)
        handle = quickmerge.patch(model, r=16)
        out = model(images)
        assert handle.tokens_per_layer == [197 - 16 * i for i in range(12)]
        assert out.shape == ref.shape == (1, 1000) and not torch.allclose(out, ref, atol=1e-4)
        handle.r = 0
        assert torch.equal(model(images), ref)


def test_nothing_of_a_call_is_held_after_it():
    model, x = tiny(), torch.randn(2, 3, 16, 16)
    with quickmerge.patch(model, r=10):
        assert alive_after_call(model.encoder.ln, lambda: model(x)) == []


@pytest.mark.parametrize("method,r", [("quickmerge", 16), ("quickmerge", 48), ("tome", 48)])
@torch.inference_mode()
def test_the_reference_vit_in_torchvision_merges_as_in_timm(method, r, reference_runs):
    """The shipped ViT converted weight for weight: the same logits unpatched, and, patched alike, the same
    merges (sizes) and predictions on real test images as timm's adapter gives."""
    from quickmerge.pretrained.fashion_vit import as_torchvision_vit

    tv_model, x = as_torchvision_vit(reference_runs.model), reference_runs.images
    unpatched = tv_model(x)
    assert torch.allclose(unpatched, reference_runs.logits, atol=1e-4, rtol=0)
    want, want_sizes, want_tokens = reference_runs.patched(method, r)
    with quickmerge.patch(tv_model, r=r, method=method) as tv_handle:
        got = tv_model(x)
        assert tv_handle.tokens_per_layer == want_tokens
        same_sizes = int((tv_handle.sizes == want_sizes).all(dim=1).sum())
    # a merge decided by a floating-point tie may differ (the keys come from other products): 0-2 of 1,024 images
    same_logits = int(((got - want).abs().amax(dim=-1) <= 1e-4).sum())
    assert same_sizes >= 254 and same_logits >= 254, (same_sizes, same_logits)
    assert int((got.argmax(-1) == want.argmax(-1)).sum()) >= 255
    assert not torch.allclose(got, unpatched, atol=1e-3)  # merging changed the logits: the check can fail


def test_the_converter_refuses_vits_it_does_not_map():
    pytest.importorskip("timm")
    from quickmerge.pretrained.fashion_vit import as_torchvision_vit, build_vit

    model = build_vit({"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3, "embed_dim": 16, "depth": 1,
                       "num_heads": 2, "global_pool": "avg", "class_token": False})
    with pytest.raises(ValueError, match="not so here: a class token, class-token pooling"):
        as_torchvision_vit(model)
