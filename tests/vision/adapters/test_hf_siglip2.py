"""quickmerge.patch on Hugging Face SigLIP 2 vision towers (NaFlex: batches padded to one length, with a mask).

Tiny random configs, eager and sdpa, in both layouts transformers has had (the tower inside
``Siglip2VisionModel.vision_model`` up to 5.2x, its parts on the model later)."""

import pytest
import torch

import quickmerge
from quickmerge.call_arguments import takes_argument
from quickmerge.vision.adapters import hf_vit
from quickmerge.vision.adapters.hf_clip import tower

from ...conftest import TRACING

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Siglip2VisionModel"):
    pytest.skip("this transformers has no SigLIP 2", allow_module_level=True)

PATCHES = 16  # the length every image is padded to
REAL = (16, 10)  # real patches of the two images: the second is padded with 6 tokens


def tiny(impl: str = "sdpa", **extra) -> torch.nn.Module:
    config = transformers.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_channels=3,
        patch_size=2, num_patches=PATCHES, attn_implementation=impl, **extra)
    torch.manual_seed(0)
    return transformers.Siglip2VisionModel(config).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, PATCHES, dtype=torch.long)
    for i, real in enumerate(REAL):
        mask[i, :real] = 1
    return {"pixel_values": torch.randn(2, PATCHES, 12, generator=g), "pixel_attention_mask": mask,
            "spatial_shapes": torch.tensor([[4, 4], [2, 5]])}


def with_garbage_padding(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch with large random values where the mask says padding (what padding holds must not matter)."""
    pixels = inputs["pixel_values"].clone()
    padding = inputs["pixel_attention_mask"] == 0
    pixels[padding] = 100.0 * torch.randn(int(padding.sum()), pixels.shape[-1], dtype=pixels.dtype)
    return {**inputs, "pixel_values": pixels}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_r0_keeps_the_padding_mask_and_is_exact_and_unpatch_restores(impl):
    model, inputs = tiny(impl), batch()
    with torch.no_grad():
        ref = model(**inputs)
        unmasked = model(**{**inputs, "pixel_attention_mask": torch.ones_like(inputs["pixel_attention_mask"])})
        assert not torch.allclose(unmasked.pooler_output[1], ref.pooler_output[1], atol=1e-3)  # the mask matters
        handle = quickmerge.patch(model, r=0)
        assert model.config._attn_implementation == "quickmerge_vit"
        out = model(**inputs)  # transformers builds masks only for implementations it knows: it must build one
        assert torch.allclose(out.pooler_output, ref.pooler_output, atol=1e-6, rtol=0)
        assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-6, rtol=0)
        handle.r = 3
        merged = model(**inputs)
        assert handle.tokens_per_layer == [16, 13, 10] and merged.last_hidden_state.shape[1] == 7
        assert handle.padded and handle.sizes.sum(dim=1).tolist() == [16.0, 10.0]  # padding stands for no patch
    quickmerge.unpatch(model)
    assert model.config._attn_implementation == impl and id(model.config) not in hf_vit._WRAPPED
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).pooler_output, ref.pooler_output)


SETTINGS = [
    dict(method="quickmerge"),
    dict(method="quickmerge", matching="greedy"),
    dict(method="quickmerge", saliency_rule="scaled"),
    dict(method="quickmerge", similarity="hidden", epsilon=0.5),
    dict(method="tome"),
    dict(method="tome", keep_order=True),
    dict(method="random"),
    dict(method="pool"),
    dict(method="quickmerge", prop_attn=False, size_weighted_pool=False),
    dict(method="tome", prop_attn=False),
]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_what_padding_holds_never_reaches_a_real_token(settings, impl):
    """Garbage in the padding leaves every output unchanged: padding is masked from every attention (the
    blocks' and the pooling head's), never decides which real tokens merge, and weighs nothing in a merge."""
    model, inputs = tiny(impl), batch()
    handle = quickmerge.patch(model, r=[4, 3, 3], trace_source=True, seed=0, **settings)
    with torch.no_grad():
        clean = model(**inputs)
        source = handle.source.clone()
        handle.configure(seed=0)
        dirty = model(**with_garbage_padding(inputs))
    assert torch.equal(handle.source[:, :REAL[1]], source[:, :REAL[1]])  # same merges of the real tokens
    assert torch.allclose(dirty.pooler_output, clean.pooler_output, atol=1e-6, rtol=0)
    real = handle.sizes > 0
    assert torch.allclose(dirty.last_hidden_state[real], clean.last_hidden_state[real], atol=1e-6, rtol=0)
    if settings["method"] != "random":  # random drops tokens (their sizes go with them)
        assert handle.sizes.sum(dim=1).tolist() == [float(n) for n in REAL]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(("method", "matching", "r"), [
    ("quickmerge", "bipartite", [3, 0, 0]),  # the 3 padding tokens of the alternate set: all of them go at once
    ("tome", "bipartite", [3, 0, 0]),
    ("quickmerge", "greedy", [6, 0, 0]),  # greedy may remove every padding token at once
    ("random", "bipartite", [6, 0, 0]),
])
def test_padding_goes_first_so_the_padded_image_is_unchanged(method, matching, r, impl):
    model, inputs = tiny(impl), batch()
    with torch.no_grad():
        ref = model(**inputs)
        with quickmerge.patch(model, r=r, method=method, matching=matching, seed=0, trace_source=True) as handle:
            out = model(**inputs)
            real = handle.source[1, :REAL[1]]
    assert real.unique().numel() == REAL[1]  # every real patch of the padded image is still a token of its own
    assert torch.allclose(out.pooler_output[1], ref.pooler_output[1], atol=1e-5, rtol=0)
    assert torch.allclose(out.last_hidden_state[1, real], ref.last_hidden_state[1, :REAL[1]], atol=1e-5, rtol=0)
    assert not torch.allclose(out.pooler_output[0], ref.pooler_output[0], atol=1e-3)  # the full image merged


def test_ratio_counts_the_padded_length_so_a_padded_image_keeps_more_of_its_real_patches():
    """The README's sentence: ``ratio`` is a share of the padded length, and padding goes first."""
    model, inputs = tiny("sdpa"), batch()
    with torch.no_grad(), quickmerge.patch(model, ratio=0.5, trace_source=True) as handle:
        model(**inputs)
        assert handle.sizes.shape[1] == PATCHES // 2  # half of the padded length, for every image
        assert (handle.sizes > 0).sum(dim=1).tolist() == [PATCHES // 2, 7]  # of 16 and of 10 real patches
        assert handle.sizes.sum(dim=1).tolist() == [float(n) for n in REAL]


def test_a_batch_without_padding_merges_as_before():
    """An all-ones mask changes nothing against no mask (the padding path adds no rounding of its own)."""
    model, inputs = tiny(), batch()
    inputs["pixel_attention_mask"] = torch.ones_like(inputs["pixel_attention_mask"])
    with torch.no_grad(), quickmerge.patch(model, r=3, trace_source=True) as handle:
        masked = model(**inputs)
        masked_source = handle.source
        plain = model(**{**inputs, "pixel_attention_mask": None})
        assert not handle.padded
        assert torch.equal(handle.source, masked_source)
        assert torch.allclose(plain.pooler_output, masked.pooler_output, atol=1e-6, rtol=0)


def test_bfloat16_padding_stays_out():
    model, inputs = tiny().to(torch.bfloat16), batch()
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad(), quickmerge.patch(model, r=3, seed=0):
        clean = model(**inputs).pooler_output
        dirty = model(**with_garbage_padding(inputs)).pooler_output
    assert clean.dtype == torch.bfloat16 and torch.isfinite(clean).all()
    assert torch.equal(clean, dirty)


def test_merge_aware_training_refuses_a_padded_batch():
    model, inputs = tiny(), batch()
    model.train()
    with quickmerge.patch(model, r=3, temperature=0.5), pytest.raises(ValueError, match="padded batches"):
        model(**inputs)


def test_set_padding_checks_its_mask_and_when_it_is_called():
    model = tiny()
    handle = quickmerge.patch(model, r=3)
    x = torch.randn(2, PATCHES, 32)
    with pytest.raises(RuntimeError, match="start of a pass"):
        handle.set_padding(torch.ones(2, PATCHES, dtype=torch.bool))
    handle.begin(x)
    with pytest.raises(ValueError, match=r"bool mask of shape \(2, 16\)"):
        handle.set_padding(torch.ones(2, PATCHES))
    with pytest.raises(ValueError, match=r"bool mask of shape \(2, 16\)"):
        handle.set_padding(torch.ones(2, PATCHES - 1, dtype=torch.bool))
    handle.end()
    quickmerge.unpatch(model)


def test_a_renamed_padding_argument_is_refused_before_any_hook():
    model = tiny()
    vision = tower(model)
    original = type(vision)

    def forward(self, pixel_values, padding, spatial_shapes):  # a release calling the mask something else
        return original.forward(self, pixel_values, padding, spatial_shapes)

    vision.__class__ = type("RenamedSiglip2", (original,), {"forward": forward})
    with pytest.raises(TypeError, match="padding mask"):
        quickmerge.patch(model, r=3)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.config._attn_implementation == "sdpa"


def test_the_dual_encoder_points_to_its_image_tower():
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=50)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=2,
                  num_patches=PATCHES)
    model = transformers.Siglip2Model(transformers.Siglip2Config(text_config=text, vision_config=vision)).eval()
    with pytest.raises(TypeError, match=r"quickmerge.patch\(model.vision_model\)"):
        quickmerge.patch(model)
    inputs = batch()
    with torch.no_grad():
        ref = model.get_image_features(**inputs)
        ref = getattr(ref, "pooler_output", ref)
        with quickmerge.patch(model.vision_model, r=2):
            out = model.get_image_features(**with_garbage_padding(inputs))
            out = getattr(out, "pooler_output", out)
    assert out.shape == ref.shape and not torch.allclose(out[0], ref[0], atol=1e-4)


def test_the_readme_s_naflex_snippet():
    """The README's lines after loading, on a tiny tower and transformers' own NaFlex processor: images of three
    aspect ratios, padded to one length, merged with padding first."""
    processor = transformers.Siglip2ImageProcessor(patch_size=2, max_num_patches=PATCHES)
    g = torch.Generator().manual_seed(0)
    images = [(255 * torch.rand(3, h, w, generator=g)).to(torch.uint8).numpy() for h, w in ((8, 8), (12, 4), (4, 10))]
    model = tiny()
    inputs = processor(images=images, return_tensors="pt", input_data_format="channels_first")
    real = inputs["pixel_attention_mask"].sum(dim=1)
    assert (real < PATCHES).any()  # some image is padded
    with torch.no_grad():
        reference = model(**inputs).pooler_output
        handle = quickmerge.patch(model, r=2)
        features = model(**inputs).pooler_output
    assert features.shape == reference.shape and torch.isfinite(features).all()
    assert torch.equal(handle.sizes.sum(dim=1), real.float())
    assert handle.tokens_per_layer == [16, 14, 12]



def tiny_classifier(impl: str = "sdpa") -> torch.nn.Module:
    config = transformers.Siglip2Config(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           patch_size=2, num_patches=PATCHES), num_labels=3)
    config.vision_config._attn_implementation = impl
    torch.manual_seed(0)
    return transformers.Siglip2ForImageClassification(config).eval()


def tower_call(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    """The tower called on its own, with the padding mask under the name this release gives it."""
    mask = "pixel_attention_mask" if takes_argument(model, "pixel_attention_mask") else "attention_mask"
    return model(pixel_values=inputs["pixel_values"], spatial_shapes=inputs["spatial_shapes"],
                 **{mask: inputs.get("pixel_attention_mask")})


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["quickmerge", "tome", "random"])
def test_the_classifier_averages_merged_tokens_over_the_real_patches_they_stand_for(method, impl):
    """Siglip2ForImageClassification averages the tower's tokens in its own forward by the padding mask of the
    unmerged tokens: copying, its logits are the classifier on the size-weighted mean of the merged tokens (padding
    weighs nothing), those the tower patched on its own returns, whatever the padding holds."""
    import copy

    from quickmerge.vision.adapters.pooling import mean_by_size

    model, inputs = tiny_classifier(impl), batch()
    alone = copy.deepcopy(model.vision_model)
    with torch.no_grad():
        ref = model(**inputs).logits
        # copying: the residual unmerge (the default) is tested in tests/vision/test_patch_unmerge.py
        handle = quickmerge.patch(model, r=0, method=method, seed=0, unmerge="copy")
        assert torch.allclose(model(**inputs).logits, ref, atol=1e-6, rtol=0)
        handle.r = [4, 3, 3]
        logits = model(**inputs).logits
        assert handle.padded and handle.tokens_per_layer == [16, 12, 9]
        tower_handle = quickmerge.patch(alone, r=[4, 3, 3], method=method, seed=0)
        tokens = tower_call(alone, inputs).last_hidden_state
        assert torch.allclose(logits, model.classifier(mean_by_size(tokens, tower_handle.sizes)), atol=1e-5, rtol=0)
        assert not torch.allclose(logits, ref, atol=1e-3)
        handle.configure(seed=0)
        assert torch.allclose(model(**with_garbage_padding(inputs)).logits, logits, atol=1e-5, rtol=0)
        assert tower_call(model.vision_model, inputs).last_hidden_state.shape[1] == 6  # on its own: merged
    quickmerge.unpatch(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)


def test_the_classifier_without_weighted_pooling_refuses_a_mask_before_running():
    """Its mean by the unmerged mask cannot apply to tokens left merged: refused, unless no mask is passed."""
    model, inputs = tiny_classifier(), batch()
    handle = quickmerge.patch(model, r=[4, 3, 3], size_weighted_pool=False)
    full = {**inputs, "pixel_attention_mask": torch.ones_like(inputs["pixel_attention_mask"])}
    for mask_given in (inputs, full):
        with torch.no_grad(), pytest.raises(ValueError, match=r"pixel_attention_mask made for.*size_weighted_pool"):
            model(**mask_given)
        assert handle.tokens_per_layer == []  # refused before the tower ran
    unmasked = {k: v for k, v in inputs.items() if k != "pixel_attention_mask"}
    with torch.no_grad():  # the head's mean of the merged tokens as they are
        tokens = tower_call(model.vision_model, unmasked).last_hidden_state
        assert torch.allclose(model(**unmasked).logits, model.classifier(tokens.mean(dim=1)), atol=1e-5, rtol=0)
        handle.r = 0  # nothing merges: the mask is the model's business
        assert model(**full).logits.shape == (2, 3)


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # signatures read when hooked
def test_the_patched_classifier_compiles_whole():
    # ToMe-style matching: QuickMerge++'s rank-weighted scores have near-ties compiled arithmetic may flip
    model, inputs = tiny_classifier(), batch()
    handle = quickmerge.patch(model, r=[4, 3, 3], method="tome")
    with torch.no_grad():
        eager = model(**inputs).logits
        try:
            compiled = torch.compile(model, backend=TRACING, fullgraph=True)(**inputs).logits
        except torch._dynamo.exc.UserError:
            handle.remove()  # transformers 5.0's position-embedding resize cannot be traced whole, patched or not
            torch.compiler.reset()
            with pytest.raises(torch._dynamo.exc.UserError):
                torch.compile(model, backend=TRACING, fullgraph=True)(**inputs)
            pytest.skip("this transformers' SigLIP 2 does not compile whole even unpatched")
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=0)


def test_entropy_calibration_leaves_the_padding_out():
    """A padded NaFlex batch calibrates as its images do alone, unpadded: padding is neither a query nor a key."""
    from quickmerge.vision.budget import block_attention_perplexity

    model, inputs = tiny(), batch()
    with torch.no_grad():
        for layer in tower(model).encoder.layers:  # sharper attention than random weights give
            layer.self_attn.q_proj.weight.mul_(8.0)
    padded = block_attention_perplexity(model, inputs)
    alone = []
    for i, real in enumerate(REAL):
        one = {"pixel_values": inputs["pixel_values"][i : i + 1, :real],
               "spatial_shapes": inputs["spatial_shapes"][i : i + 1],
               "pixel_attention_mask": torch.ones(1, real, dtype=torch.long)}
        alone.append(block_attention_perplexity(model, one))
    assert padded == pytest.approx([(a + b) / 2 for a, b in zip(*alone, strict=True)], rel=1e-5)
    assert block_attention_perplexity(model, with_garbage_padding(inputs)) == pytest.approx(padded, rel=1e-5)
    assert block_attention_perplexity(model, inputs, batch_size=1) == pytest.approx(padded, rel=1e-5)
    assert all(1.0 <= v <= 10.0 + 1e-4 for v in alone[1])  # the padded image's own 10 tokens bound its perplexity
    with pytest.raises(ValueError, match="images: every input must hold the same number"):
        block_attention_perplexity(model, {**inputs, "spatial_shapes": inputs["spatial_shapes"][:1]})
