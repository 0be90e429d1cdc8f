"""quickmerge.patch on the Hugging Face AIMv2 vision tower (tiny random configs, eager and SDPA): no class token,
pre-norm RMSNorm layers, an optional attention-pooling head."""

import warnings

import pytest
import torch

import quickmerge
from quickmerge.vision.adapters import HFAimv2Adapter, find_adapter

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Aimv2VisionModel"):
    pytest.skip("this transformers has no AIMv2", allow_module_level=True)


def tiny(impl: str = "sdpa", use_head: bool = True) -> torch.nn.Module:
    config = transformers.Aimv2VisionConfig(image_size=16, patch_size=2, num_channels=1, hidden_size=32,
                                            intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            use_head=use_head, attn_implementation=impl)
    torch.manual_seed(0)
    model = transformers.Aimv2VisionModel(config).eval()
    with torch.no_grad():
        if use_head:
            model.head.cls_token.normal_()  # zeros at initialisation: a query that attends evenly everywhere
    return model


def two_regions() -> torch.Tensor:
    x = torch.full((2, 1, 16, 16), -0.4)
    x[:, :, :, 12:] = 0.7
    return x


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Within ``tol`` of ``b``'s largest entry (a random tiny head's outputs are ~1e-3)."""
    return bool((a - b).abs().max() <= tol * b.abs().max())


def zero_positions(model: torch.nn.Module) -> None:
    with torch.no_grad():
        model.embeddings.position_embedding.weight.zero_()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_r0_is_exact_and_unpatch_restores(impl):
    model, x = tiny(impl), torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a tested class
            handle = quickmerge.patch(model, r=0)
        assert isinstance(find_adapter(model), HFAimv2Adapter) and handle.num_prefix_tokens == 0
        assert model.config._attn_implementation == "quickmerge_vit"
        out = model(pixel_values=x)
        assert close(out.pooler_output, ref.pooler_output, 1e-5)
        assert close(out.last_hidden_state, ref.last_hidden_state, 1e-5)
        handle.r = 12
        merged = model(pixel_values=x)
        assert handle.tokens_per_layer == [64, 52, 40] and merged.last_hidden_state.shape[1] == 28
        assert not close(merged.pooler_output, ref.pooler_output, 1e-2)
    quickmerge.unpatch(model)
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).pooler_output, ref.pooler_output)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_merging_copies_leaves_the_pooled_output_exact_and_the_head_weighs_patches(impl):
    # two flat regions, positions zeroed: the tokens are copies of two; ToMe-style matching merges copies, and with
    # sizes counted in the blocks' attention and in the head's (each patch a copy of its token) nothing changes
    model, x = tiny(impl), two_regions()
    zero_positions(model)
    with torch.no_grad():
        ref = model(pixel_values=x).pooler_output
        with quickmerge.patch(model, r=[16, 12, 8], method="tome") as handle:
            assert close(model(pixel_values=x).pooler_output, ref, 1e-5)
            assert handle.tokens_per_layer == [64, 48, 36]
            handle.size_weighted_pool = False  # the head reads the merged tokens as they are: copies weigh less
            assert not close(model(pixel_values=x).pooler_output, ref, 1e-2)
            handle.size_weighted_pool = True
            handle.prop_attn = False  # the blocks count merged copies once (random blocks add little: ~0.8%)
            assert not close(model(pixel_values=x).pooler_output, ref, 1e-3)


def test_the_head_reads_each_patch_as_the_token_it_was_merged_into():
    model, x = tiny(), torch.randn(2, 1, 16, 16)
    seen = []  # what the head is called on, after the patch's own pre-hook
    with torch.no_grad(), quickmerge.patch(model, r=8, trace_source=True) as handle:
        model.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        out = model(pixel_values=x)
        tokens = out.last_hidden_state  # the merged tokens the tower returns
        full = tokens.gather(1, handle.source[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, 64, C]
        assert seen[-1].shape == (2, 64, 32) and torch.allclose(seen[-1], full, atol=0, rtol=0)
        assert close(model.head(full), out.pooler_output, 1e-6)
        assert not close(model.head(tokens), out.pooler_output, 1e-2)  # the merged tokens unweighted: another answer


def test_a_tower_without_a_head_returns_its_merged_tokens():
    model, x = tiny(use_head=False), torch.randn(2, 1, 16, 16)
    with torch.no_grad(), quickmerge.patch(model, r=8) as handle:
        out = model(pixel_values=x)
    assert out.pooler_output is None and out.last_hidden_state.shape == (2, 64 - 24, 32)
    assert handle.tokens_per_layer == [64, 56, 48]


def test_hidden_states_are_the_merged_blocks_inputs():
    if transformers.__version__.startswith("5.0."):
        pytest.skip("transformers 5.0 records hidden states inside the layers: refused (test_hf_vit.py)")
    model, x = tiny(), torch.randn(2, 1, 16, 16)
    with torch.no_grad(), quickmerge.patch(model, r=8) as handle:
        out = model(pixel_values=x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [*handle.tokens_per_layer, 40]


def test_the_tower_inside_aimv2model_is_patched_and_the_model_is_refused_with_a_pointer():
    config = transformers.Aimv2Config(
        vision_config=dict(image_size=16, patch_size=2, num_channels=1, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16),
        projection_dim=16)
    model = transformers.Aimv2Model(config).eval()
    with pytest.raises(TypeError, match="Aimv2Model"):
        quickmerge.patch(model, r=4)
    with torch.no_grad(), quickmerge.patch(model.vision_model, r=4) as handle:
        features = model.get_image_features(pixel_values=torch.randn(2, 1, 16, 16))
    features = getattr(features, "pooler_output", features)
    assert features.shape == (2, 16) and handle.tokens_per_layer == [64, 60]


def test_flash_attention_is_refused_before_any_hook():
    model = tiny("sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        quickmerge.patch(model, r=4)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
