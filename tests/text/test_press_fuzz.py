"""Hypothesis fuzzing of the KV presses over tiny Llama / Qwen3 / Gemma 3 configurations: context
lengths x ratios (0 included) x batch sizes x eager/SDPA x decoding inside, outside and with generate."""

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from quickmerge.text import QuickMergePress, RandomEvictionPress, ToMeKVPress  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from quickmerge.text.decoder import sliding_window_of  # noqa: E402
from tests.text.tiny import duplicated_cache, tiny  # noqa: E402

PRESSES = {"quickmerge": QuickMergePress, "tome": ToMeKVPress, "random": RandomEvictionPress}


@functools.cache
def _model(kind: str, attn: str):
    return tiny(kind, attn, layers=3)


def _no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    kind=st.sampled_from(["llama", "qwen3", "gemma3"]),
    attn=st.sampled_from(["eager", "sdpa"]),
    context=st.integers(2, 40),
    ratio=st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]),
    batch=st.integers(1, 3),
    decode=st.sampled_from(["inside", "outside", "generate"]),
    press_name=st.sampled_from(sorted(PRESSES)),
    new_tokens=st.integers(1, 4),
)
def test_press_keeps_lengths_exactness_and_restores(kind, attn, context, ratio, batch, decode, press_name, new_tokens):
    model = _model(kind, attn)
    gen = torch.Generator().manual_seed(context * 31 + batch)
    ids = torch.randint(0, 97, (batch, context), generator=gen)
    cont = torch.randint(0, 97, (batch, new_tokens), generator=gen)
    press = PRESSES[press_name](compression_ratio=ratio)
    with torch.no_grad():
        unpatched = model(torch.cat([ids, cont], 1)).logits[:, context:]
    if decode == "generate":
        mask = torch.ones_like(ids)
        with torch.no_grad():
            reference = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        with press(model):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
        assert out.shape == reference.shape and torch.equal(out[:, :context], ids)
        if ratio == 0.0:
            assert torch.equal(out, reference)
    else:
        cache = transformers.DynamicCache()
        with torch.no_grad():
            with press(model):
                model(ids, **cache_kwargs(model, cache))
                oracle = duplicated_cache(cache) if press_name != "random" else None
                if decode == "inside":
                    logits = model(cont, **cache_kwargs(model, cache)).logits
            if decode == "outside":
                logits = model(cont, **cache_kwargs(model, cache)).logits
        kept = max(1, int(context * (1 - ratio)))
        for layer, block in zip(cache.layers, model.model.layers, strict=True):
            full = sliding_window_of(block.self_attn) is None
            assert layer.keys.shape == (batch, 2, (kept if full else context) + new_tokens, 16)
        assert torch.isfinite(logits).all()
        if ratio == 0.0 or kept == context:
            assert torch.allclose(logits, unpatched, atol=1e-4)
        if oracle is not None and decode == "inside":
            with torch.no_grad():
                assert torch.allclose(logits, model(cont, **cache_kwargs(model, oracle)).logits, atol=1e-4)
    assert _no_hooks(model)
    with torch.no_grad():
        assert torch.equal(model(torch.cat([ids, cont], 1)).logits[:, context:], unpatched)
