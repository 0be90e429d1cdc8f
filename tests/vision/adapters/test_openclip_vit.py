"""quickmerge.patch on OpenCLIP's image tower (tiny random towers): exactness, restore, size-weighted average pooling,
feature maps and the refusals (its nn.MultiheadAttention hook: test_multihead.py)."""

import pytest
import torch

import quickmerge

from ...conftest import alive_after_call, tokens_on_grid

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

open_clip_transformer = pytest.importorskip("open_clip.transformer")


def tiny(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip_transformer.VisionTransformer(image_size=16, patch_size=2, width=32, layers=3, heads=4,
                                                   mlp_ratio=2.0, output_dim=24, **extra).eval()


@pytest.mark.parametrize("extra", [{}, {"pool_type": "avg"}, {"ls_init_value": 0.1}, {"output_tokens": True}],
                         ids=["tok", "avg", "layerscale", "tokens"])
def test_r0_is_exact_and_unpatch_restores(extra):
    model, x = tiny(**extra), torch.randn(2, 3, 16, 16)
    first = (lambda out: out[0]) if extra.get("output_tokens") else (lambda out: out)
    with torch.no_grad():
        ref = first(model(x))
        handle = quickmerge.patch(model, r=0)
        assert torch.equal(first(model(x)), ref)
        handle.r = 12
        out = model(x)
        assert handle.tokens_per_layer == [65, 53, 41]
        assert not torch.allclose(first(out), ref, atol=1e-4)
        if extra.get("output_tokens"):
            assert out[1].shape == (2, 28, 32)  # the merged patch tokens
    quickmerge.unpatch(model)
    with torch.no_grad():
        assert torch.equal(first(model(x)), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert "_global_pool" not in model.__dict__ and "forward_intermediates" not in model.__dict__


def test_average_pooling_weights_tokens_by_size():
    model = tiny(pool_type="avg")
    with torch.no_grad():
        model.positional_embedding.zero_()
        x = torch.full((2, 3, 16, 16), -0.4)
        x[:, :, :, 12:] = 0.7  # a quarter of the patches: merged, the regions' token counts are unequal
        ref = model(x)
        with quickmerge.patch(model, r=[16, 12, 8], method="tome") as handle:
            assert torch.allclose(model(x), ref, atol=1e-5)
            assert not torch.equal(handle.sizes[:, 1:2].expand(2, 28), handle.sizes[:, 1:])
            handle.size_weighted_pool = False
            assert not torch.allclose(model(x), ref, atol=1e-3)


def test_feature_maps_put_each_blocks_merged_tokens_back_on_the_grid():
    model, x = tiny(), torch.randn(2, 3, 16, 16)
    with torch.no_grad(), quickmerge.patch(model, r=8, trace_source=True, unmerge="copy") as handle:
        tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)["image_intermediates"]
        assert [t.shape[1] for t in tokens] == [56, 48, 40]
        out = model.forward_intermediates(x, output_extra_tokens=True)
        assert torch.allclose(out["image_features"], model(x), atol=1e-6, rtol=0)
        assert [p.shape for p in out["image_intermediates_prefix"]] == [(2, 1, 32)] * 3
        for block in range(3):
            alone = model.forward_intermediates(x, indices=[block], stop_early=True, intermediates_only=True)
            want = tokens_on_grid(tokens[block], handle.source, 1, 8)
            assert torch.equal(alone["image_intermediates"][0], want)
            assert torch.equal(out["image_intermediates"][block], want)
        handle.r = 0
        assert model.forward_intermediates(x)["image_intermediates"][0].shape == (2, 32, 8, 8)
    assert "forward_intermediates" not in model.__dict__


@pytest.mark.parametrize("extra,match", [({"attentional_pool": True}, "CoCa"), ({"qk_norm": True}, "custom blocks")])
def test_towers_it_cannot_patch_are_refused_untouched(extra, match):
    model = tiny(**extra)
    with pytest.raises(TypeError, match=match):
        quickmerge.patch(model, r=4)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_gradient_checkpointing_refuses_to_train():
    model = tiny()
    model.set_grad_checkpointing(True)
    with quickmerge.patch(model, r=8):
        model.train()
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            model(torch.randn(2, 3, 16, 16)).sum().backward()


def test_the_readme_s_openclip_model_patches_with_the_readme_s_settings():
    """The README's snippet on the same architecture, randomly initialised (no weights can be downloaded)."""
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.create_model("ViT-B-16").eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = model.encode_image(images)
        handle = quickmerge.patch(model.visual, r=16)
        image_features = model.encode_image(images)
    assert handle.tokens_per_layer == [197 - 16 * i for i in range(12)]
    assert image_features.shape == ref.shape == (1, 512) and not torch.allclose(image_features, ref, atol=1e-4)
    handle.r = 0
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), ref)


def test_a_whole_openclip_model_is_refused_with_the_way_to_its_image_tower():
    open_clip = pytest.importorskip("open_clip")
    model = open_clip.model.CLIP(embed_dim=24, vision_cfg={"image_size": 16, "patch_size": 2, "width": 32,
                                                            "layers": 2, "head_width": 8},
                                 text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 4, "layers": 1})
    with pytest.raises(TypeError, match=r"quickmerge.patch\(model.visual\)"):
        quickmerge.patch(model, r=4)
    handle = quickmerge.patch(model.visual.eval(), r=4)
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 16, 16))
    assert handle.tokens_per_layer == [65, 61]
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.transformer.modules())  # text tower


@pytest.mark.parametrize("extra", [{}, {"pool_type": "avg"}], ids=["tok", "avg"])
def test_nothing_of_a_call_is_held_after_it(extra):
    model, x = tiny(**extra), torch.randn(2, 3, 16, 16)
    with quickmerge.patch(model, r=10):
        assert alive_after_call(model.ln_post, lambda: model(x)) == []
