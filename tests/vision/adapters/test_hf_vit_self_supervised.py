"""quickmerge.patch on the self-supervised ViTs of transformers built from ViT's layer: I-JEPA (no class token; its
classifier averages every token), ViT-MSN and ViT-MAE (its encoder runs on the patches a random mask keeps; the
pre-training decoder puts a token back on every visible patch). Eager and SDPA."""

import warnings

import pytest
import torch

import quickmerge
from quickmerge.vision.adapters import find_adapter, mean_by_size

transformers = pytest.importorskip("transformers")

PATCHES = 64  # 16 x 16 images, 2 x 2 patches
MAE_KEPT = 32  # mask_ratio 0.5


def tiny(cls_name: str, impl: str = "sdpa", **extra) -> torch.nn.Module:
    common = dict(image_size=16, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, intermediate_size=64, attn_implementation=impl)
    if cls_name.startswith("IJepa"):
        config = transformers.IJepaConfig(**common, num_labels=5)
    elif cls_name.startswith("ViTMSN"):
        config = transformers.ViTMSNConfig(**common, num_labels=5)
    else:
        config = transformers.ViTMAEConfig(**common, mask_ratio=0.5, decoder_hidden_size=16,
                                           decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                           decoder_intermediate_size=32)
    return getattr(transformers, cls_name)(config, **extra).eval()


def base(model: torch.nn.Module) -> torch.nn.Module:
    return next((getattr(model, n) for n in ("ijepa", "vit") if hasattr(model, n)), model)


NOISE = torch.rand(2, PATCHES, generator=torch.Generator().manual_seed(0))  # MAE's random mask, fixed


def output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    kwargs = {"noise": NOISE} if "MAE" in type(model).__name__ else {}
    out = model(pixel_values=x, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# tokens entering the first block: [CLS] (none in I-JEPA) and the patches (MAE's visible ones)
TOKENS = {"IJepaModel": PATCHES, "IJepaForImageClassification": PATCHES, "ViTMSNModel": PATCHES + 1,
          "ViTMSNForImageClassification": PATCHES + 1, "ViTMAEModel": MAE_KEPT + 1}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", list(TOKENS))
def test_r0_is_exact_and_unpatch_restores(cls_name, impl):
    model, x = tiny(cls_name, impl), torch.randn(2, 1, 16, 16)
    ref = output(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class here is a tested one
        handle = quickmerge.patch(model, r=0)
    assert find_adapter(model).name.startswith("Hugging Face ViT")
    assert handle.num_prefix_tokens == (0 if cls_name.startswith("IJepa") else 1)
    assert model.config._attn_implementation == "quickmerge_vit"
    assert torch.allclose(output(model, x), ref, atol=1e-5, rtol=0)
    handle.r = 8
    merged = output(model, x)
    n = TOKENS[cls_name]
    assert handle.tokens_per_layer == [n, n - 8, n - 16]
    if not cls_name.endswith("Classification"):
        assert merged.shape[1] == n - 24
    assert not torch.allclose(merged if merged.shape == ref.shape else merged[:, 0], ref if merged.shape == ref.shape
                              else ref[:, 0], atol=1e-5)
    quickmerge.unpatch(model)
    assert model.config._attn_implementation == impl
    assert torch.equal(output(model, x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["IJepaForImageClassification", "ViTMSNForImageClassification", "ViTMAEModel"])
def test_proportional_attention_makes_merging_duplicates_exact(cls_name, impl):
    # two flat regions, positions zeroed: the patch tokens are copies of two; ToMe-style matching merges copies, and
    # merged copies that count by their size in attention change nothing (I-JEPA, with no class token, needs two
    # regions: copies of one token attend alike however they are counted)
    model = tiny(cls_name, impl)
    with torch.no_grad():
        base(model).embeddings.position_embeddings.zero_()
    x = torch.full((2, 1, 16, 16), -0.4)
    x[:, :, :, 12:] = 0.7
    ref = output(model, x)[:, :1]  # logits, or [CLS]'s state
    with quickmerge.patch(model, r=[16, 12, 8], method="tome") as handle:
        assert torch.allclose(output(model, x)[:, :1], ref, atol=1e-5)
        handle.prop_attn = False
        assert not torch.allclose(output(model, x)[:, :1], ref, atol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_ijepa_classifier_averages_every_patch_by_size_and_stays_exact_on_duplicates(impl):
    # two flat regions, positions zeroed: merging copies changes nothing if the head's mean is over patches
    model = tiny("IJepaForImageClassification", impl)
    with torch.no_grad():
        model.ijepa.embeddings.position_embeddings.zero_()
    x = torch.full((2, 1, 16, 16), -0.4)
    x[:, :, :, 12:] = 0.7
    ref = output(model, x)
    handle = quickmerge.patch(model, r=[16, 12, 8], method="tome")
    assert torch.allclose(output(model, x), ref, atol=1e-5)
    handle.size_weighted_pool = False  # the merged tokens averaged as they are: copies now weigh what they are
    assert not torch.allclose(output(model, x), ref, atol=1e-4)
    quickmerge.unpatch(model)
    assert torch.equal(output(model, x), ref)


def test_ijepa_classifier_reads_the_patches_unmerged_and_its_base_alone_stays_merged():
    model, x = tiny("IJepaForImageClassification"), torch.randn(2, 1, 16, 16)
    with torch.no_grad(), quickmerge.patch(model, r=8, unmerge="copy") as handle:
        logits = output(model, x)
        tokens = model.ijepa(pixel_values=x).last_hidden_state  # the same merges, outside the head's call
        assert tokens.shape[1] == PATCHES - 24 and handle.tokens_per_layer == [64, 56, 48]
        assert torch.allclose(logits, model.classifier(mean_by_size(tokens, handle.sizes)), atol=1e-5, rtol=0)
        assert not torch.allclose(logits, model.classifier(tokens.mean(dim=1)), atol=1e-4)


def test_an_ijepa_model_with_its_first_token_pooler_is_refused_before_any_hook():
    model = tiny("IJepaModel", add_pooling_layer=True)
    with pytest.raises(TypeError, match=r"pooler reads the first patch token.*add_pooling_layer=False"):
        quickmerge.patch(model, r=8)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_msn_classifier_reads_the_class_token_it_never_merges():
    model, x = tiny("ViTMSNForImageClassification"), torch.randn(2, 1, 16, 16)
    with torch.no_grad(), quickmerge.patch(model, r=8, method="quickmerge") as handle:
        logits = output(model, x)
        tokens = model.vit(pixel_values=x).last_hidden_state
        assert handle.sizes[:, 0].eq(1).all() and tokens.shape[1] == PATCHES + 1 - 24
        assert torch.allclose(logits, model.classifier(tokens[:, 0]), atol=1e-5, rtol=0)


def test_mae_pre_training_decodes_each_visible_patch_from_the_token_it_was_merged_into():
    model, x = tiny("ViTMAEForPreTraining"), torch.randn(2, 1, 16, 16)
    seen = []  # the decoder's input: [CLS] and a token for every visible patch, in the mask's order
    model.decoder.decoder_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        ref = model(pixel_values=x, noise=NOISE)
        with quickmerge.patch(model, r=6, unmerge="copy", trace_source=True) as handle:
            out = model(pixel_values=x, noise=NOISE)
            tokens = model.vit(pixel_values=x, noise=NOISE).last_hidden_state  # merged: the base alone
            assert handle.tokens_per_layer == [33, 27, 21] and tokens.shape[1] == 1 + MAE_KEPT - 18
            full = tokens.gather(1, handle.source[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, 33, C]
    assert seen[1].shape == seen[0].shape == (2, 1 + MAE_KEPT, 32)
    assert torch.allclose(seen[1], full, atol=1e-6, rtol=0)
    assert not torch.allclose(seen[1], seen[0], atol=1e-3)
    assert torch.equal(out.mask, ref.mask) and torch.equal(out.ids_restore, ref.ids_restore)
    assert torch.isfinite(out.loss) and out.logits.shape == ref.logits.shape == (2, PATCHES, 2 * 2)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mae_pre_training_decodes_the_unmerged_stream_by_residual_when_blocks_only_average(impl):
    # every block's two branches zeroed: a block passes its input on, so merging only averages the stream, and the
    # residual unmerge (the default) gives each visible patch its own stream back before the final norm
    model, x = tiny("ViTMAEForPreTraining", impl), torch.randn(2, 1, 16, 16)
    ends = [p for name, p in model.vit.named_parameters()
            if name.endswith(("output.dense.weight", "output.dense.bias", "fc2.weight", "fc2.bias",
                              "o_proj.weight", "o_proj.bias"))]
    assert len(ends) == 4 * 3
    with torch.no_grad():
        for p in ends:
            p.zero_()
        ref = model(pixel_values=x, noise=NOISE).logits
        with quickmerge.patch(model, r=6) as handle:
            assert torch.allclose(model(pixel_values=x, noise=NOISE).logits, ref, atol=1e-5, rtol=0)
            handle.unmerge = "copy"
            assert not torch.allclose(model(pixel_values=x, noise=NOISE).logits, ref, atol=1e-3)


@pytest.mark.parametrize("cls_name,method,r", [("ViTForImageClassification", "quickmerge", 16),
                                               ("ViTForImageClassification", "tome", 48),
                                               ("ViTMSNForImageClassification", "quickmerge", 48)])
@torch.inference_mode()
def test_the_reference_vit_in_hugging_face_merges_as_in_timm(cls_name, method, r, reference_runs):
    """The shipped ViT converted weight for weight into HF's ViT / ViT-MSN classifier: the same logits unpatched, and,
    patched alike, the same merges (sizes) and predictions on real test images as timm's adapter gives."""
    from quickmerge.pretrained.fashion_vit import as_hf_vit

    hf_model, x = as_hf_vit(reference_runs.model, cls_name), reference_runs.images
    unpatched = hf_model(pixel_values=x).logits
    assert torch.allclose(unpatched, reference_runs.logits, atol=1e-4, rtol=0)
    want, want_sizes, want_tokens = reference_runs.patched(method, r)
    with quickmerge.patch(hf_model, r=r, method=method) as hf_handle:
        got = hf_model(pixel_values=x).logits
        assert hf_handle.tokens_per_layer == want_tokens
        same_sizes = int((hf_handle.sizes == want_sizes).all(dim=1).sum())
    # a merge decided by a floating-point tie may differ (the keys come from other products)
    same_logits = int(((got - want).abs().amax(dim=-1) <= 1e-4).sum())
    assert same_sizes >= 254 and same_logits >= 254, (same_sizes, same_logits)
    assert int((got.argmax(-1) == want.argmax(-1)).sum()) >= 255
    assert not torch.allclose(got, unpatched, atol=1e-3)  # merging changed the logits


def test_the_hugging_face_converter_refuses_vits_and_classes_it_does_not_map():
    pytest.importorskip("timm")
    from quickmerge.pretrained.fashion_vit import as_hf_vit, build_vit

    model = build_vit({"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3, "embed_dim": 16, "depth": 1,
                       "num_heads": 2, "global_pool": "avg", "class_token": False})
    with pytest.raises(ValueError, match=r"as_hf_vit needs .* not so here: a class token, class-token pooling"):
        as_hf_vit(model)
    with pytest.raises(ValueError, match="cls_name must be one of"):
        as_hf_vit(build_vit({"img_size": 8, "patch_size": 2, "in_chans": 1, "num_classes": 3, "embed_dim": 16,
                             "depth": 1, "num_heads": 2}), "IJepaForImageClassification")
