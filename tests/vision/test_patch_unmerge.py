"""Putting merged tokens back on the patch grid: the residual unmerge (``unmerge="residual"``, the default of the
dense heads quickmerge drives) against copying (``"copy"``).

The check that can fail: with every block's branches scaled to zero by its layer scale, each block passes its input
on unchanged, so merging only averages the residual stream; the residual unmerge then gives every patch its own
stream back exactly, at every stage and through several merges, and copying does not."""

import re

import pytest
import torch

import quickmerge

BRANCH_SCALES = re.compile(r"(ls_?[12]\.gamma|layer_scale[12]\.lambda1|\.gamma_[12])$")


def identity_blocks(model: torch.nn.Module, depth: int, branches: re.Pattern = BRANCH_SCALES,
                    per_block: int = 2) -> torch.nn.Module:
    """Zero what scales every block's attention and MLP branches (their layer scales, or where a family has none
    the last linear of each branch, ``per_block`` parameters a block): each block returns its input."""
    scales = [p for name, p in model.named_parameters() if branches.search(name)]
    assert len(scales) == per_block * depth
    with torch.no_grad():
        for p in scales:
            p.zero_()
    return model


def timm_vit():
    pytest.importorskip("timm")
    from .adapters.test_timm_vit import tiny_vit

    return identity_blocks(tiny_vit(True, init_values=0.1, reg_tokens=1), 3), torch.randn(2, 1, 16, 16)


def timm_eva():
    pytest.importorskip("timm")
    from .adapters.test_timm_eva import CONFIGS, SIZE, tiny_eva

    return identity_blocks(tiny_eva(init_values=0.1, **CONFIGS["dinov3_registers"]), 3), torch.randn(2, 3, SIZE, SIZE)


def openclip():
    pytest.importorskip("open_clip")
    from .adapters.test_openclip_vit import tiny

    return identity_blocks(tiny(ls_init_value=0.1), 3), torch.randn(2, 3, 16, 16)


def maps(model, x, **kwargs) -> list[torch.Tensor]:
    """Each block's normed patch tokens as a map, then its normed prefix tokens."""
    if hasattr(model, "transformer"):  # OpenCLIP
        out = model.forward_intermediates(x, normalize_intermediates=True, output_extra_tokens=True,
                                          intermediates_only=True, **kwargs)
        return [*out["image_intermediates"], *out["image_intermediates_prefix"]]
    pairs = model.forward_intermediates(x, norm=True, return_prefix_tokens=True, intermediates_only=True, **kwargs)
    return [t for pair in pairs for t in pair]


@pytest.mark.parametrize("keep_order", [False, True], ids=["shuffled", "in_order"])
@pytest.mark.parametrize("build", [timm_vit, timm_eva, openclip])
@torch.no_grad()
def test_feature_maps_unmerged_by_residual_are_the_unmerged_models_when_blocks_only_average(build, keep_order):
    model, x = build()
    ref = maps(model, x)
    with quickmerge.patch(model, r=8, keep_order=keep_order) as handle:
        got = maps(model, x)
        assert handle.tokens_per_layer[1:] == [handle.tokens_per_layer[0] - 8, handle.tokens_per_layer[0] - 16]
        assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(got, ref, strict=True))
        alone = maps(model, x, indices=[1], stop_early=True)  # a pass ended early, at its second stage
        assert torch.allclose(alone[0], ref[2], atol=1e-5, rtol=0)
        handle.unmerge = "copy"
        copied = maps(model, x)
        assert not torch.allclose(copied[2], ref[2], atol=1e-3)  # block 1's map: copying loses each patch's own
        assert handle._deviations is None  # copying keeps nothing


@torch.no_grad()
def test_a_backbone_s_feature_maps_unmerged_by_residual_are_the_unmerged_models_when_blocks_only_average():
    pytest.importorskip("transformers")
    from .adapters.test_hf_vit import tiny_backbone

    model, x = identity_blocks(tiny_backbone("Dinov2Backbone"), 3), torch.randn(2, 1, 16, 16)
    ref = model(pixel_values=x).feature_maps
    with quickmerge.patch(model, r=12) as handle:
        out = model(pixel_values=x, output_hidden_states=True)
        assert handle.tokens_per_layer == [65, 53, 41]
        assert all(torch.allclose(a, b, atol=1e-5, rtol=0) for a, b in zip(out.feature_maps, ref, strict=True))
        handle.unmerge = "copy"
        copied = model(pixel_values=x).feature_maps
        assert not torch.allclose(copied[2], ref[2], atol=1e-3)


@torch.no_grad()
def test_expand_to_patches_residual_needs_kept_deviations_and_then_restores_the_stream():
    pytest.importorskip("timm")
    model, x = timm_vit()
    stream = []
    model.blocks[-1].register_forward_hook(lambda _m, _a, out: stream.append(out))
    reference = model.forward_features(x)  # pre-norm stream: the final norm comes after the last block
    handle = quickmerge.patch(model, r=8)
    model.forward_features(x)  # a plain pass keeps no deviations (a classifier pays nothing)
    assert handle._deviations is None
    with pytest.raises(ValueError, match="keep_deviations"):
        handle.expand_to_patches(stream[-1], residual=True)
    copied = handle.expand_to_patches(stream[-1])
    handle.keep_deviations = True
    model.forward_features(x)
    restored = handle.expand_to_patches(stream[-1], residual=True)
    assert torch.allclose(restored, stream[0], atol=1e-5, rtol=0) and not torch.allclose(copied, stream[0], atol=1e-3)
    assert torch.allclose(model.norm(stream[0]), reference, atol=1e-5, rtol=0)
    # within a group the deviations sum to zero over its patches: the mean over the patches is copying's
    p = handle.num_prefix_tokens
    assert torch.allclose(restored[:, p:].mean(1), copied[:, p:].mean(1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unmerge"):
        handle.unmerge = "smooth"
    handle.remove()


# the last linears of a CLIP / SigLIP encoder layer's branches (the pooling head's own left alone)
BRANCH_OUTPUTS = re.compile(r"encoder\.layers\.\d+\.(self_attn\.out_proj|mlp\.fc2)\.(weight|bias)$")


def zeroed_branches(model: torch.nn.Module, depth: int) -> torch.nn.Module:
    return identity_blocks(model, depth, BRANCH_OUTPUTS, per_block=4)


def timm_avg(build=timm_vit):
    def built():
        model, x = build()
        model.reset_classifier(5, global_pool="avg")  # keeps the final norm: every token normed, then averaged
        return model, (x,), {}, lambda out: out

    return built


def openclip_avg(final_ln_after_pool: bool):
    def build():
        pytest.importorskip("open_clip")
        from .adapters.test_openclip_vit import tiny

        model = tiny(ls_init_value=0.1, pool_type="avg", final_ln_after_pool=final_ln_after_pool)
        return identity_blocks(model, 3), (torch.randn(2, 3, 16, 16),), {}, lambda out: out

    return build


def hf_classifier(family: str):
    def build():
        pytest.importorskip("transformers")
        if family == "Dinov2":
            from .adapters.test_hf_vit import tiny

            model = identity_blocks(tiny("Dinov2ForImageClassification", "sdpa"), 3)
            return model, (), {"pixel_values": torch.randn(2, 1, 16, 16)}, lambda out: out.logits
        if family == "Siglip2":
            from .adapters.test_hf_siglip2 import batch, tiny_classifier

            return zeroed_branches(tiny_classifier(), 3), (), batch(), lambda out: out.logits
        from .adapters.test_hf_clip import tiny_classifier

        model = zeroed_branches(tiny_classifier(family), 3)
        return model, (), {"pixel_values": torch.randn(2, 3, 16, 16)}, lambda out: out.logits

    return build


# the head averages the stream itself (no norm between): copying's size-weighted mean is already every patch's own
@pytest.mark.parametrize(("build", "stream_mean"), [
    (timm_avg(), False), (timm_avg(timm_eva), False), (openclip_avg(False), False), (openclip_avg(True), True),
    (hf_classifier("Dinov2"), False), (hf_classifier("Siglip"), False), (hf_classifier("Siglip2"), False),
    (hf_classifier("CLIP"), True)],
    ids=["timm-avg", "eva-avg", "openclip-avg", "openclip-avg-ln-after-pool", "Dinov2", "Siglip", "Siglip2", "CLIP"])
@torch.no_grad()
def test_heads_averaging_their_tokens_read_each_patch_s_own_stream_when_blocks_only_average(build, stream_mean):
    """A head that norms every token and then averages them (timm's and Eva's avg pooling after their final norm,
    OpenCLIP's before ``ln_post`` by default, DINOv2's, SigLIP's and SigLIP 2's classifiers) reads each patch's own
    stream under the residual unmerge: the unmerged model's logits, where copying's mean of the normed merged tokens
    is not. CLIP's classifier and OpenCLIP's ``final_ln_after_pool`` average the stream itself: size-weighted
    merges keep that mean, so both unmerges give it and the pass keeps nothing. ``random``
    drops tokens: their patches have no stream left, and the mean is copying's, over the kept patches."""
    model, args, kwargs, logits = build()
    ref = logits(model(*args, **kwargs))
    with quickmerge.patch(model, r=[6, 5, 5], method="tome") as handle:
        got = logits(model(*args, **kwargs))
        assert handle.sizes is not None and (handle._deviations is None) == stream_mean  # such a pass keeps nothing
        handle.unmerge = "copy"
        copied = logits(model(*args, **kwargs))
        assert torch.allclose(got, ref, atol=1e-5, rtol=0)
        if stream_mean:
            assert torch.allclose(copied, ref, atol=1e-5, rtol=0)
        else:
            assert not torch.allclose(copied, ref, atol=1e-4)
        handle.configure(unmerge="residual", method="random", seed=0)
        dropped = logits(model(*args, **kwargs))
        handle.configure(unmerge="copy", seed=0)
        assert torch.allclose(dropped, logits(model(*args, **kwargs)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("build", [timm_avg(), timm_avg(timm_eva), openclip_avg(False)],
                         ids=["timm-avg", "eva-avg", "openclip-avg"])
@torch.no_grad()
def test_a_normed_mean_outside_a_call_of_the_model_reads_own_streams_from_a_pass_that_kept_them(build):
    """timm's ``forward_head`` on features of a separate ``forward_features`` pass: by size, unless the handle's
    ``keep_deviations`` kept that pass's deviations. OpenCLIP's ``forward_intermediates`` pools its final features
    from a pass the residual unmerge keeps for its feature maps: the same features as a call of the tower."""
    model, (x,), _, _ = build()
    ref = model(x)
    with quickmerge.patch(model, r=[6, 5, 5], method="tome") as handle:
        if hasattr(model, "forward_head"):
            def pooled():
                return model.forward_head(model.forward_features(x))

            assert not torch.allclose(pooled(), ref, atol=1e-4)  # a plain pass keeps nothing: by size
            handle.keep_deviations = True
        else:
            def pooled():
                return model.forward_intermediates(x)["image_features"]

        assert torch.allclose(pooled(), ref, atol=1e-5, rtol=0)
        handle.unmerge = "copy"
        assert not torch.allclose(pooled(), ref, atol=1e-4)
