"""quickmerge.patch on the Hugging Face BLIP, BLIP-2 and InstructBLIP vision towers (tiny random configs): BLIP's
written-out attention (eager only) and the others' attention interface (eager and SDPA)."""

import warnings

import pytest
import torch

import quickmerge
from quickmerge.vision import get_handle
from quickmerge.vision.adapters import HFBlipAdapter, find_adapter

transformers = pytest.importorskip("transformers")

FAMILIES = {"BlipVisionModel": "BlipVisionConfig", "Blip2VisionModel": "Blip2VisionConfig",
            "InstructBlipVisionModel": "InstructBlipVisionConfig",
            "InstructBlipVideoVisionModel": "InstructBlipVideoVisionConfig"}
VISION = dict(image_size=16, patch_size=2, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, initializer_range=0.02)  # the families default to 1e-10: near-zero blocks
# BLIP's attention is written out (no implementation to choose); the others' go through the attention interface
CASES = [("BlipVisionModel", "eager")] + [(name, impl) for name in list(FAMILIES)[1:] for impl in ("eager", "sdpa")]


def tiny(cls_name: str, impl: str = "eager", **settings) -> torch.nn.Module:
    config = getattr(transformers, FAMILIES[cls_name])(**{**VISION, **settings}, attn_implementation=impl)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


def flat_image() -> torch.Tensor:
    return torch.full((2, 3, 16, 16), -0.4)


@pytest.mark.parametrize("cls_name,impl", CASES)
def test_r0_is_exact_and_unpatch_restores(cls_name, impl):
    model, x = tiny(cls_name, impl), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a tested class
            handle = quickmerge.patch(model, r=0)
        assert isinstance(find_adapter(model), HFBlipAdapter) and handle.num_prefix_tokens == 1
        out = model(pixel_values=x)
        assert torch.allclose(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
        assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
        handle.r = 12
        merged = model(pixel_values=x)
        assert handle.tokens_per_layer == [65, 53, 41] and merged.last_hidden_state.shape[1] == 29
        assert not torch.allclose(merged.pooler_output, ref.pooler_output, atol=1e-3)
    quickmerge.unpatch(model)
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).pooler_output, ref.pooler_output)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("cls_name,impl", CASES)
def test_proportional_attention_makes_merging_duplicates_exact(cls_name, impl):
    # a flat image, positions zeroed: every patch token is a copy; merged with their sizes counted in the attention
    # (BLIP: its probabilities re-weighted), the class token and the kept copies are what they were unmerged
    model = tiny(cls_name, impl)
    with torch.no_grad():
        model.embeddings.position_embedding.zero_()
        ref = model(pixel_values=flat_image())
        with quickmerge.patch(model, r=20, method="pool") as handle:
            merged = model(pixel_values=flat_image())
            assert handle.tokens_per_layer == [65, 45, 25]
            assert torch.allclose(merged.last_hidden_state, ref.last_hidden_state[:, :5], atol=1e-5, rtol=0)
            assert torch.allclose(merged.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
            handle.prop_attn = False  # each copy counted once: the class token attends to another mix
            unweighted = model(pixel_values=flat_image())
            assert not torch.allclose(unweighted.pooler_output, ref.pooler_output, atol=1e-3)


def test_blips_attention_gets_the_probabilities_of_logits_plus_log_size():
    # the dropout pre-hook's re-weighting against softmax(q k^T * scale + log size), computed here from what qkv
    # returned, in the second block: the first merged 16 tokens, the others merge none (the sizes stay)
    model, x = tiny("BlipVisionModel"), torch.randn(2, 3, 16, 16)
    attention = model.encoder.layers[1].self_attn
    seen = {}
    with torch.no_grad(), quickmerge.patch(model, r=[16, 0, 0], method="tome") as handle:
        attention.qkv.register_forward_hook(lambda _m, _a, out: seen.update(qkv=out))
        attention.dropout.register_forward_hook(lambda _m, _a, out: seen.update(probs=out))
        model(pixel_values=x)
    b, n, _ = seen["qkv"].shape
    q, k, _ = seen["qkv"].reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * attention.scale
    assert n == 49 and handle.sizes.shape == (2, 49) and handle.sizes.max() > 1
    expected = torch.softmax(logits + handle.sizes.log()[:, None, None, :], dim=-1)
    assert torch.allclose(seen["probs"], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(seen["probs"], torch.softmax(logits, dim=-1), atol=1e-3)


@pytest.mark.parametrize("method", ["quickmerge", "tome"])
def test_blips_written_out_attention_merges_as_blip2s_attention_interface_on_the_same_weights(method):
    # the same function in both (BLIP-2's qkv has no key bias: BLIP's is zeroed); what BLIP's hooks read off qkv
    # and re-weight after the softmax must give BLIP-2's merges and outputs, whose attention function gets q, k
    blip, blip2 = tiny("BlipVisionModel"), tiny("Blip2VisionModel", "sdpa", layer_norm_eps=1e-5)
    weights = blip.state_dict()
    for name, value in weights.items():
        if name.endswith("qkv.bias"):
            value[32:64] = 0
    blip.load_state_dict(weights)
    blip2.load_state_dict(weights)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), quickmerge.patch(blip, r=12, method=method) as ours, \
            quickmerge.patch(blip2, r=12, method=method) as theirs:
        out, ref = blip(pixel_values=x), blip2(pixel_values=x)
    assert torch.equal(ours.sizes, theirs.sizes) and ours.sizes.max() > 1
    assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)


def test_hidden_states_are_the_merged_blocks_inputs():
    if transformers.__version__.startswith("5.0."):
        pytest.skip("transformers 5.0 records hidden states inside the layers: refused (test_hf_vit.py)")
    for cls_name, impl in CASES[:2]:
        model = tiny(cls_name, impl)
        with torch.no_grad(), quickmerge.patch(model, r=8) as handle:
            out = model(pixel_values=torch.randn(2, 3, 16, 16), output_hidden_states=True)
        assert [h.shape[1] for h in out.hidden_states] == [*handle.tokens_per_layer, 41]


def test_the_tower_of_blip2_feeds_the_q_former_its_merged_tokens_and_the_model_points_to_it():
    config = transformers.Blip2Config(
        vision_config={**VISION, "num_hidden_layers": 2},
        qformer_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=99, max_position_embeddings=16),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                         vocab_size=99, word_embed_proj_dim=32, max_position_embeddings=32),
        num_query_tokens=4)
    torch.manual_seed(0)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    with pytest.raises(TypeError, match=r"quickmerge.patch\(model.vision_model\)"):
        quickmerge.patch(model, r=4)
    x = torch.randn(2, 3, 16, 16)
    read = []  # what the Q-Former's cross-attention reads
    model.qformer.register_forward_pre_hook(lambda _m, a, kw: read.append(kw["encoder_hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=x)
        with quickmerge.patch(model.vision_model, r=8) as handle:
            features = model.get_image_features(pixel_values=x)
    ref, features = (getattr(f, "pooler_output", f) for f in (ref, features))
    assert handle.tokens_per_layer == [65, 57] and read[0].shape[1] == 65 and read[1].shape[1] == 49
    assert features.shape == ref.shape == (2, 4, 32) and not torch.allclose(features, ref, atol=1e-4)


def test_gradient_checkpointing_refuses_to_train():
    model = tiny("BlipVisionModel")
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with quickmerge.patch(model, r=8):
        model.train()
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            model(pixel_values=torch.randn(2, 3, 16, 16)).pooler_output.sum().backward()


def test_flash_attention_and_a_blip_attention_without_its_dropout_are_refused_before_any_hook():
    model = tiny("Blip2VisionModel", "sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        quickmerge.patch(model, r=4)
    assert get_handle(model) is None and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model = tiny("BlipVisionModel")
    del model.encoder.layers[2].self_attn.dropout
    with pytest.raises(TypeError, match="no dropout module"):
        quickmerge.patch(model, r=4)
    assert get_handle(model) is None and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_blip_attention_reached_neither_way_is_refused_before_any_hook():
    # a release whose BLIP attention neither calls the attention interface nor takes its own softmax and dropout
    # (as its code reads) must not be hooked the old way, where the re-weighting would silently never run
    model = tiny("BlipVisionModel")
    attention = model.encoder.layers[1].self_attn

    class Fused(type(attention)):
        def forward(self, hidden_states, **kwargs):
            q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
            return self.projection(torch.nn.functional.scaled_dot_product_attention(q, k, v)), None

    attention.__class__ = Fused
    with pytest.raises(TypeError, match=r"Fused\.forward neither calls"):
        quickmerge.patch(model, r=4)
    assert get_handle(model) is None and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
