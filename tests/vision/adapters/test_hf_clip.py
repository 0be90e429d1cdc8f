"""quickmerge.patch on Hugging Face CLIP and SigLIP vision towers (tiny random configs, eager and sdpa)."""

import pytest
import torch
from packaging.version import Version

import quickmerge
from quickmerge.vision import get_handle
from quickmerge.vision.adapters.hf_clip import tower

transformers = pytest.importorskip("transformers")

CLASSES = ["CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel"]


def tiny(cls_name: str, impl: str) -> torch.nn.Module:
    common = dict(image_size=16, patch_size=2, num_channels=3, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=3, num_attention_heads=4, attn_implementation=impl)
    config = (transformers.SiglipVisionConfig if cls_name.startswith("Siglip") else transformers.CLIPVisionConfig)(
        **common)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


def output(model, x) -> torch.Tensor:
    out = model(pixel_values=x)
    return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", CLASSES)
def test_r0_is_exact_and_unpatch_restores(cls_name, impl):
    model, x = tiny(cls_name, impl), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref, states = output(model, x), model(pixel_values=x).last_hidden_state
        handle = quickmerge.patch(model, r=0)
        assert model.config._attn_implementation == "quickmerge_vit"
        assert torch.allclose(output(model, x), ref, atol=1e-5, rtol=0)
        handle.r = 12
        prefix = 1 if cls_name.startswith("CLIP") else 0  # CLIP's class token; SigLIP has none
        merged = model(pixel_values=x).last_hidden_state
        assert handle.tokens_per_layer == [64 + prefix, 52 + prefix, 40 + prefix]
        assert merged.shape[1] == 28 + prefix and states.shape[1] == 64 + prefix
        assert not torch.allclose(output(model, x), ref, atol=1e-5)
    quickmerge.unpatch(model)
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(output(model, x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_proportional_attention_makes_merging_duplicates_exact(cls_name):
    """Identical patches merged with their sizes leave every remaining token's state unchanged."""
    model = tiny(cls_name, "sdpa")
    with torch.no_grad():
        tower(model).embeddings.position_embedding.weight.zero_()
        x = torch.full((2, 3, 16, 16), -0.4)
        ref = model(pixel_values=x).last_hidden_state
        with quickmerge.patch(model, r=20, method="pool") as handle:
            merged = model(pixel_values=x).last_hidden_state
            assert torch.allclose(merged, ref[:, : merged.shape[1]], atol=1e-5)
            handle.prop_attn = False
            unweighted = model(pixel_values=x).last_hidden_state
            if cls_name.startswith("CLIP"):  # the class token attends to a different mix without sizes
                assert not torch.allclose(unweighted[:, :1], ref[:, :1], atol=1e-3)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_siglip_pooling_head_attends_by_size_and_stays_exact_on_duplicates(impl):
    # two flat regions, positions zeroed: merging copies changes nothing if the head's probe attends
    # to each merged token as to all the patches it stands for
    model = tiny("SiglipVisionModel", impl)
    with torch.no_grad():
        tower(model).embeddings.position_embedding.weight.zero_()
        x = torch.full((2, 3, 16, 16), -0.4)
        x[:, :, :, 12:] = 0.7
        ref = model(pixel_values=x).pooler_output
        with quickmerge.patch(model, r=[16, 12, 8], method="tome") as handle:
            assert torch.allclose(model(pixel_values=x).pooler_output, ref, atol=1e-5)
            handle.size_weighted_pool = False
            assert not torch.allclose(model(pixel_values=x).pooler_output, ref, atol=1e-4)
        assert torch.equal(model(pixel_values=x).pooler_output, ref)


def test_class_tokens_and_saliency_follow_the_family():
    clip, siglip = tiny("CLIPVisionModel", "sdpa"), tiny("SiglipVisionModel", "sdpa")
    x = torch.randn(2, 3, 16, 16)
    for model, alone in ((clip, True), (siglip, False)):
        with torch.no_grad(), quickmerge.patch(model, ratio=0.25, method="quickmerge", trace_source=True) as handle:
            assert torch.isfinite(model(pixel_values=x).pooler_output).all()
            assert bool((handle.source[:, 0] == 0).all() and (handle.source[:, 1:] != 0).all()) == alone


def test_gradient_checkpointing_refuses_to_train():
    model = tiny("CLIPVisionModel", "sdpa")
    # transformers 5.24 renamed gradient_checkpointing_enable; the guard must see either
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with quickmerge.patch(model, r=8):
        model.train()
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            output(model, torch.randn(2, 3, 16, 16)).sum().backward()


def test_flash_attention_is_refused_before_any_hook():
    model = tiny("SiglipVisionModel", "sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match=r"'flash_attention_2'.*attn_implementation='sdpa'"):
        quickmerge.patch(model, r=8, prop_attn=False)
    assert get_handle(model) is None and model.config._attn_implementation == "flash_attention_2"


@pytest.mark.parametrize("family", ["CLIP", "Siglip"])
def test_the_tower_of_a_dual_encoder_patches_and_the_whole_model_points_to_it(family):
    """CLIPModel / SiglipModel (zero-shot classification): their vision_model is a ...VisionTransformer up to
    transformers 5.2x and a ...VisionModel after; either patches, and the whole model is refused with the way."""
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=16)
    vision = dict(image_size=16, patch_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4)
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(text_config=text, vision_config=vision)
    model, x = getattr(transformers, f"{family}Model")(config).eval(), torch.randn(2, 3, 16, 16)

    def features():
        out = model.get_image_features(pixel_values=x)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        ref = features()
        with pytest.raises(TypeError, match=r"quickmerge.patch\(model.vision_model\)"):
            quickmerge.patch(model, r=4)
        handle = quickmerge.patch(model.vision_model, r=0)
        assert torch.allclose(features(), ref, atol=1e-5, rtol=0)
        handle.r = 12
        merged = features()
        prefix = 1 if family == "CLIP" else 0
        assert handle.tokens_per_layer == [64 + prefix, 52 + prefix, 40 + prefix]
        assert not torch.allclose(merged, ref, atol=1e-4)
        quickmerge.unpatch(model.vision_model)
        assert torch.equal(features(), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("matching,r", [("bipartite", [28, 14, 8]), ("greedy", [40, 16, 4])])
@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_matching_by_the_residual_stream_joins_only_copies(cls_name, matching, r):
    """Two flat regions, positions zeroed: ``similarity="hidden"`` (with the scaled rule) must pair tokens of one
    region only, so the tower's pooled output is the unmerged one's."""
    model = tiny(cls_name, "sdpa")
    with torch.no_grad():
        tower(model).embeddings.position_embedding.weight.zero_()
        x = torch.full((2, 3, 16, 16), -0.4)
        x[:, :, :, 10:] = 0.7
        ref = output(model, x)
        with quickmerge.patch(model, r=r, similarity="hidden", saliency_rule="scaled", matching=matching) as handle:
            assert torch.allclose(output(model, x), ref, atol=1e-5)
            handle.method = "pool"  # contiguous runs cross the regions' edge: the check can fail
            assert not torch.allclose(output(model, x), ref, atol=1e-4)


def tiny_classifier(family: str, impl: str = "sdpa") -> torch.nn.Module:
    vision = dict(image_size=16, patch_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    config = getattr(transformers, f"{family}Config")(text_config=text, vision_config=vision, num_labels=5)
    config.vision_config._attn_implementation = impl
    torch.manual_seed(0)
    return getattr(transformers, f"{family}ForImageClassification")(config).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("settings", [dict(method="quickmerge"), dict(method="tome"), dict(method="random")],
                         ids=lambda s: s["method"])
@pytest.mark.parametrize("family", ["CLIP", "Siglip"])
def test_a_classifier_averages_its_merged_tokens_over_the_patches_they_stand_for(family, settings, impl):
    """CLIP/SigLIPForImageClassification average the tower's tokens in their own forward (CLIP over the patch
    tokens, SigLIP over all): copying, their logits are the classifier on the size-weighted mean of the merged tokens,
    those the tower patched on its own returns; random drops tokens, whose patches must not count."""
    import copy

    from quickmerge.vision.adapters.pooling import mean_by_size

    model, x = tiny_classifier(family, impl), torch.randn(2, 3, 16, 16)
    alone = copy.deepcopy(model.vision_model)
    prefix = 1 if family == "CLIP" else 0
    with torch.no_grad():
        ref = model(pixel_values=x).logits
        # copying: SigLIP's residual unmerge (the default) is tested in tests/vision/test_patch_unmerge.py
        handle = quickmerge.patch(model, r=0, seed=0, unmerge="copy", **settings)
        assert torch.allclose(model(pixel_values=x).logits, ref, atol=1e-6, rtol=0)
        handle.r = 12
        logits = model(pixel_values=x).logits
        assert handle.tokens_per_layer == [64 + prefix, 52 + prefix, 40 + prefix]
        tower_handle = quickmerge.patch(alone, r=12, seed=0, **settings)
        tokens = alone(pixel_values=x).last_hidden_state[:, prefix:]
        expected = model.classifier(mean_by_size(tokens, tower_handle.sizes[:, prefix:]))
        assert torch.allclose(logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(logits, ref, atol=1e-3)
        if settings["method"] == "random":  # 36 of the 64 patches dropped: a plain mean over 64 would differ
            assert tower_handle.sizes[:, prefix:].sum(dim=1).tolist() == [28.0, 28.0]
        # the tower called on its own still returns its merged tokens
        assert model.vision_model(pixel_values=x).last_hidden_state.shape[1] == 28 + prefix
    quickmerge.unpatch(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, ref)


@pytest.mark.parametrize("family", ["CLIP", "Siglip"])
def test_a_classifier_without_weighted_pooling_averages_the_merged_tokens_and_trains(family):
    model, x = tiny_classifier(family), torch.randn(2, 3, 16, 16)
    prefix = 1 if family == "CLIP" else 0
    handle = quickmerge.patch(model, r=12, size_weighted_pool=False)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
        tokens = model.vision_model(pixel_values=x).last_hidden_state[:, prefix:]
        assert torch.allclose(logits, model.classifier(tokens.mean(dim=1)), atol=1e-5, rtol=0)
    handle.size_weighted_pool = True
    model.train()
    loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, torch.tensor([0, 3]))
    loss.backward()  # gradients reach the patch embedding through the expansion and every merge
    grad = tower(model.vision_model).embeddings.patch_embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_a_classifier_call_that_fails_leaves_its_tower_returning_merged_tokens():
    model = tiny_classifier("CLIP")
    quickmerge.patch(model, r=12)
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(pixel_values=torch.randn(2, 5, 16, 16))  # five channels: the patch embedding raises
        # (inside the classifier's call, after its pre-hook ran)
    with torch.no_grad():
        assert model.vision_model(pixel_values=torch.randn(2, 3, 16, 16)).last_hidden_state.shape[1] == 29


@pytest.mark.parametrize("cls_name", ["CLIPVisionModel", "SiglipVisionModel"])
def test_hidden_states_are_the_merged_blocks_inputs_even_after_an_unpatched_run(cls_name):
    """A model run before patching records hidden states by hooks ahead of quickmerge's (transformers 5.x):
    they must still see each block's merged output, not the block's own sum of the unmerged length."""
    model, x = tiny(cls_name, "sdpa"), torch.randn(2, 3, 16, 16)
    prefix = 1 if cls_name.startswith("CLIP") else 0
    with torch.no_grad():
        model(pixel_values=x, output_hidden_states=True)
        handle = quickmerge.patch(model, r=12)
        if Version(transformers.__version__) < Version("5.2"):  # records inside each layer's forward: refused
            counts = ", ".join(str(n + prefix) for n in (64, 64, 52, 40))
            with pytest.raises(RuntimeError, match=rf"recorded hidden states of \[{counts}\] tokens.*5\.2"):
                model(pixel_values=x, output_hidden_states=True)
            return
        out = model(pixel_values=x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [*handle.tokens_per_layer, 28 + prefix]
    final = out.hidden_states[-1] if prefix else tower(model).post_layernorm(out.hidden_states[-1])  # SigLIP norms
    assert torch.allclose(final, out.last_hidden_state, atol=1e-6, rtol=0)


def test_a_siglip_classifier_with_its_final_norm_renamed_is_refused():
    """The residual pooling goes in where the tower's post_layernorm receives the stream: a release without it is
    refused before any hook; a norm swapped in after patching (no hook on it) raises rather than pooling merged."""
    model, x = tiny_classifier("Siglip"), torch.randn(2, 3, 16, 16)
    model.vision_model.final_norm = model.vision_model.post_layernorm
    del model.vision_model.post_layernorm
    with pytest.raises(TypeError, match="no final norm named post_layernorm"):
        quickmerge.patch(model, r=8)
    assert not hasattr(model, "_quickmerge_handle")
    model.vision_model.post_layernorm = model.vision_model.final_norm
    handle = quickmerge.patch(model, r=8)
    model.vision_model.post_layernorm = torch.nn.LayerNorm(32)
    with torch.no_grad(), pytest.raises(RuntimeError, match="without calling LayerNorm"):
        model(pixel_values=x)
    handle.unmerge = "copy"
    with torch.no_grad():
        assert model(pixel_values=x).logits.shape == (2, 5)


@pytest.mark.parametrize("cls_name", CLASSES)
def test_nothing_of_a_call_is_held_after_it(cls_name):
    from ...conftest import alive_after_call

    model, x = tiny(cls_name, "sdpa"), torch.randn(2, 3, 16, 16)
    with quickmerge.patch(model, r=10):
        assert alive_after_call(tower(model).post_layernorm, lambda: output(model, x)) == []


def test_entropy_budget_is_calibrated_on_a_siglip_tower_without_a_class_token():
    """SigLIP's vision tower has no class token: the budget reads its patch tokens' own attention."""
    from quickmerge.vision.budget import block_attention_perplexity

    model = tiny("SiglipVisionModel", "sdpa")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        values = block_attention_perplexity(model, x)
        assert len(values) == 3 and all(1.0 <= v <= 64.0 + 1e-3 for v in values)  # 64 patches
        keys = [m for name, m in model.named_modules() if name.endswith("self_attn.k_proj")]  # nested per release
        assert len(keys) == 3
        for key in keys:  # zero keys: uniform attention over every patch
            torch.nn.init.zeros_(key.weight)
            torch.nn.init.zeros_(key.bias)
        assert block_attention_perplexity(model, x) == pytest.approx([64.0] * 3, rel=1e-5)
