"""The KV press on hybrid models (tests/text/tiny.py ``HYBRID_KINDS``): Qwen 3.5, its mixture of experts and
Qwen3-Next run three gated-DeltaNet (linear-attention) layers to each attention layer, whose queries carry an output
gate. Only the attention layers hold a KV cache; the press merges theirs and leaves the linear layers' fixed-size
states as an unpatched prefill leaves them. Before transformers 5.5 these models keep a cache class of their own,
without layers, and the press refuses it. Decoding runs one token per call: transformers 5.5 continues a
linear-attention state wrongly over several new tokens in one call (not the press's doing; right from 5.12)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from packaging.version import Version  # noqa: E402

from quickmerge.text import QuickMergeInputPress, QuickMergePress  # noqa: E402
from quickmerge.text.cache import UnsupportedCacheError, cache_kwargs  # noqa: E402
from quickmerge.text.decoder import decoder_attention_layers, decoder_layers, has_attention  # noqa: E402
from quickmerge.text.scoring import observe  # noqa: E402
from tests.text.test_architectures import _image_prompt, _recorded_prefill  # noqa: E402
from tests.text.tiny import HYBRID_KINDS, duplicated_cache, one_at_a_time, press_and_oracle, tiny  # noqa: E402

LAYERED = Version(transformers.__version__) >= Version("5.5")  # DynamicCache's layers from 5.5 on
needs_layers = pytest.mark.skipif(not LAYERED, reason="transformers < 5.5: the model keeps its own cache class")
CLASSES = {"qwen3.5": "Qwen3_5ForCausalLM", "qwen3.5-moe": "Qwen3_5MoeForCausalLM",
           "qwen3-next": "Qwen3NextForCausalLM", "qwen3.5-vl": "Qwen3_5ForConditionalGeneration"}


def _hybrid(kind: str, attn: str = "sdpa"):
    if not hasattr(transformers, CLASSES[kind]):
        pytest.skip(f"this transformers has no {CLASSES[kind]}")
    return tiny(kind, attn)


def _linear_states(cache, model):
    """Copies of the linear-attention layers' convolution and recurrent states."""
    return [(layer.conv_states[0].clone(), layer.recurrent_states[0].clone())
            for block, layer in zip(decoder_layers(model), cache.layers, strict=True) if not has_attention(block)]


@needs_layers
@pytest.mark.parametrize("kind", HYBRID_KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("scoring", ["window", "replay"])
def test_the_attention_layers_merge_and_the_linear_layers_keep_their_state(kind, attn, scoring):
    """Ratio 0 is exact; at 0.5 the attention layer holds half the prompt, decoding equals the duplicated-cache
    oracle, and the linear layers' states equal an unpatched prefill's (replay scoring reads the prompt through
    them a second time)."""
    model = _hybrid(kind, attn)
    ids, cont = torch.randint(1, 90, (2, 24)), torch.randint(1, 90, (2, 3))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 24:]
        plain = transformers.DynamicCache(config=model.config)
        model(ids, **cache_kwargs(model, plain))
        cache = transformers.DynamicCache(config=model.config)
        with QuickMergePress(0.0, scoring=scoring)(model):
            model(ids, **cache_kwargs(model, cache))
            assert torch.allclose(one_at_a_time(model, cont, cache), reference, atol=1e-5)
        press, cache = QuickMergePress(0.5, window=4, scoring=scoring), transformers.DynamicCache(config=model.config)
        with press(model):
            model(ids, **cache_kwargs(model, cache))
            states = _linear_states(cache, model)
            oracle = duplicated_cache(cache)
            merged = one_at_a_time(model, cont, cache)
        assert torch.allclose(merged, one_at_a_time(model, cont, oracle), atol=1e-5)
    assert [layer.keys.shape[2] for layer in cache.layers if hasattr(layer, "keys")] == [12 + 3]
    assert len(states) == 3
    for (conv, recurrent), (plain_conv, plain_recurrent) in zip(states, _linear_states(plain, model), strict=True):
        assert torch.equal(conv, plain_conv) and torch.equal(recurrent, plain_recurrent)
    assert not torch.allclose(merged, reference, atol=1e-4)


@needs_layers
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_qwen3_5_with_an_image_in_the_prompt_merges_as_with_text(attn):
    """Qwen3_5ForConditionalGeneration, the class of Qwen 3.5's checkpoints: with an image in the prompt (its tokens on
    three axes, multimodal RoPE) ratio 0 is exact and the merged cache decodes as the duplicated-cache oracle."""
    model = _hybrid("qwen3.5-vl", attn)
    ids, image = _image_prompt(model, "qwen3-vl")
    cont, n = torch.randint(1, 90, (2, 3)), ids.shape[1]
    reference, runs = press_and_oracle(model, ids, cont, image, new_cache=lambda: transformers.DynamicCache(
        config=model.config), decode=one_at_a_time)
    for ratio, (merged, oracle, cache) in runs.items():
        assert torch.allclose(merged, oracle, atol=1e-5)
        assert [layer.keys.shape[2] for layer in cache.layers if hasattr(layer, "keys")] == [n + 3 - round(ratio * n)]
        assert torch.allclose(merged, reference, atol=1e-5) == (ratio == 0.0)


@needs_layers
@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_the_press_sees_the_gated_attention_the_model_computes(kind):
    """The query projection gives a query and an output gate per head: the press scores with the query half, whose
    attention equals the model's own eager weights."""
    model = _hybrid(kind, "eager")
    ids = torch.randint(1, 90, (1, 30), generator=torch.Generator().manual_seed(1))
    seen, cache, weights = _recorded_prefill(model, ids, cache=transformers.DynamicCache(config=model.config))
    (attention,) = decoder_attention_layers(model)
    i = attention.layer_idx
    got = observe(attention, seen[i].pop("hidden"), cache.layers[i].keys, seen[i], window=30).probs
    want = [w for w in weights if w is not None][-1]
    assert torch.allclose(got, want.float(), atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_the_input_press_is_refused_and_an_unlayered_cache_too(kind):
    """The input press would hand the linear layers a merged prompt they take no positions or masks for: refused
    before any work. Before transformers 5.5 the KV press refuses the model's own cache class, naming the release."""
    model = _hybrid(kind)
    ids = torch.randint(1, 90, (1, 24))
    with pytest.raises(ValueError, match=f"linear-attention layers of {CLASSES[kind]}"), \
            QuickMergeInputPress(0.5, layer=0)(model):
        pass
    if LAYERED:
        return
    with torch.no_grad(), pytest.raises(UnsupportedCacheError, match=r"transformers 5\.5 or later"), \
            QuickMergePress(0.5)(model):
        model(ids)


def test_layers_of_another_kind_are_named():
    """A hybrid model whose other layers are neither attention nor a linear attention (LFM2's convolutions) is refused
    with those layers named, not with a claim that the model has no attention."""
    if not hasattr(transformers, "Lfm2ForCausalLM"):
        pytest.skip("this transformers has no LFM2")
    config = transformers.Lfm2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     layer_types=["conv", "full_attention", "conv", "full_attention"])
    with pytest.raises(TypeError, match=r"layers \[0, 2\] of Lfm2ForCausalLM neither attend"), \
            QuickMergePress(0.5)(transformers.Lfm2ForCausalLM(config)):
        pass
