"""QuickMergePress on tiny random-weight causal LMs: exactness, restoration, shapes, errors."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import (  # noqa: E402
    QuickMergePress,
    RandomEvictionPress,
    ToMeKVPress,
)

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _tiny(kind: str, attn: str):
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, sliding_window=None))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=16))
    model.set_attn_implementation(attn)
    return model.eval()


MODELS = [(k, a) for k in ("llama", "mistral", "qwen2", "qwen3") for a in ("eager", "sdpa")]


def _prefill_then_score(model, press, ids, cont, inside=True):
    cache = transformers.DynamicCache()
    positions = torch.arange(ids.shape[1], ids.shape[1] + cont.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        if press is None:
            model(ids, past_key_values=cache)
            return model(cont, past_key_values=cache, position_ids=positions).logits, cache
        with press(model):
            model(ids, past_key_values=cache)
            if inside:
                return model(cont, past_key_values=cache, position_ids=positions).logits, cache
        return model(cont, past_key_values=cache, position_ids=positions).logits, cache


@pytest.mark.parametrize("kind,attn", MODELS)
def test_ratio_zero_reproduces_the_unpatched_model_and_exit_restores_it(kind, attn):
    model = _tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 30:]
    logits, cache = _prefill_then_score(model, QuickMergePress(compression_ratio=0.0), ids, cont)
    assert cache.get_seq_length() == 36
    assert torch.allclose(logits, reference, atol=1e-5)
    press = QuickMergePress(compression_ratio=0.5, window=4)
    _prefill_then_score(model, press, ids, cont)
    with torch.no_grad():
        after = model(torch.cat([ids, cont], 1)).logits[:, 30:]
    assert torch.equal(after, reference)  # hooks and per-layer state are gone
    assert all(not hasattr(layer.self_attn, "_quickmerge_bias") for layer in model.model.layers)


@pytest.mark.parametrize("kind,attn", MODELS)
@pytest.mark.parametrize("press_cls", [QuickMergePress, ToMeKVPress, RandomEvictionPress])
def test_compression_keeps_the_requested_share(kind, attn, press_cls):
    model = _tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 5))
    press = press_cls(compression_ratio=0.5, **({"window": 8} if press_cls is QuickMergePress else {}))
    logits, cache = _prefill_then_score(model, press, ids, cont)
    assert press.original_length == 40 and press.compressed_length == 20
    assert press.achieved_ratio == pytest.approx(0.5)
    assert cache.get_seq_length() == 20 + 5
    assert logits.shape == (2, 5, 97) and torch.isfinite(logits).all()


def test_proportional_attention_changes_decoding_and_positions_continue():
    model = _tiny("llama", "sdpa")
    ids, cont = torch.randint(0, 97, (1, 40)), torch.randint(0, 97, (1, 5))
    with_bias, _ = _prefill_then_score(model, QuickMergePress(0.5, window=4), ids, cont)
    without, _ = _prefill_then_score(model, QuickMergePress(0.5, window=4, proportional=False), ids, cont)
    assert not torch.allclose(with_bias, without)
    # Inside the context, positions of new tokens continue from the original length by themselves.
    press = QuickMergePress(0.5, window=4)
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
        implicit = model(cont, past_key_values=cache).logits
    assert torch.allclose(implicit, with_bias, atol=1e-5)


def test_generate_inside_the_press():
    model = _tiny("llama", "sdpa")
    ids = torch.randint(0, 97, (2, 32))
    press = QuickMergePress(0.5, window=4)
    with press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 36) and press.achieved_ratio == pytest.approx(0.5)


def test_errors():
    with pytest.raises(ValueError, match="compression_ratio"):
        QuickMergePress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="window"):
        QuickMergePress(window=0)
    with pytest.raises(ValueError, match="salient"):
        QuickMergePress(salient="middle")
    with pytest.raises(TypeError, match="no decoder layers"), QuickMergePress()(torch.nn.Linear(2, 2)):
        pass
    model = _tiny("llama", "sdpa")
    ids = torch.randint(0, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded"), QuickMergePress(0.5, window=4)(model):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("kind,attn", MODELS)
def test_input_mode_exact_at_ratio_zero_and_shrinks_upper_layers(kind, attn):
    from quickmerge.text import QuickMergeInputPress

    model = _tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 30:]
    logits, cache = _prefill_then_score(model, QuickMergeInputPress(0.0, layer=0), ids, cont)
    assert torch.allclose(logits, reference, atol=1e-5)
    press = QuickMergeInputPress(0.5, layer=0, window=4)
    logits, cache = _prefill_then_score(model, press, ids, cont)
    assert [cache.get_seq_length(i) for i in range(2)] == [36, 21]
    assert press.achieved_ratio == pytest.approx(0.5) and torch.isfinite(logits).all()
    with torch.no_grad():
        assert torch.equal(model(torch.cat([ids, cont], 1)).logits[:, 30:], reference)


def test_input_mode_errors():
    from quickmerge.text import QuickMergeInputPress

    with pytest.raises(ValueError, match="layer"):
        QuickMergeInputPress(layer=-1)
    with (
        pytest.raises(ValueError, match="below the last decoder layer"),
        QuickMergeInputPress(layer=1)(_tiny("llama", "sdpa")),
    ):
        pass


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma3_merges_global_layers_and_is_exact_at_ratio_zero(attn):
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    ids, cont = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 30:]
    logits, _ = _prefill_then_score(model, QuickMergePress(compression_ratio=0.0), ids, cont)
    assert torch.allclose(logits, reference, atol=1e-5)
    press = QuickMergePress(compression_ratio=0.5, window=4)
    logits, cache = _prefill_then_score(model, press, ids, cont)
    assert cache.layers[1].keys.shape[2] == 15 + 6  # the global layer holds the merged prompt + new tokens
    assert press.achieved_ratio == pytest.approx(0.5) and torch.isfinite(logits).all()
    # Without positions, tokens decoded inside the press are placed after the original prompt.
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache)
        implicit = model(cont, past_key_values=cache).logits
    assert torch.allclose(implicit, logits, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(torch.cat([ids, cont], 1)).logits[:, 30:], reference)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "rows"}, "mode"),
        ({"bias": "none"}, "bias"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kmeans_iters": -1}, "kmeans_iters"),
        ({"epsilon": 0.0}, "epsilon"),
    ],
)
def test_press_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuickMergePress(**kwargs)


@pytest.mark.parametrize("press_cls", [ToMeKVPress, RandomEvictionPress])
def test_baselines_carry_only_their_own_options(press_cls):
    with pytest.raises(TypeError, match="window"):
        press_cls(compression_ratio=0.5, window=8)
    with pytest.raises(ValueError, match="compression_ratio"):
        press_cls(compression_ratio=1.5)
