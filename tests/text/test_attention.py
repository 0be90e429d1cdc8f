"""Proportional attention keeps SDPA's grouped-query path: no key/value head is repeated per step."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import QuickMergePress  # noqa: E402
from quickmerge.text.attention import NAME  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from quickmerge.text.decoder import base_model  # noqa: E402
from tests.text.tiny import duplicated_cache, tiny  # noqa: E402


@pytest.mark.parametrize("kind", ["llama", "qwen3", "phi3", "gemma3", "gemma3-vlm"])
def test_grouped_sdpa_inside_the_press_equals_the_duplicated_cache_and_is_restored(kind, monkeypatch):
    model = tiny(kind, "sdpa", layers=3)
    ids, cont = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 3))
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1], kwargs.get("enable_gqa", False), kwargs.get("attn_mask")))
        return sdpa(query, key, value, *args, **kwargs)

    cache = transformers.DynamicCache()
    decoder = base_model(model).config  # a vision-language model's text config: the tower's is left alone
    with torch.no_grad(), QuickMergePress(0.5, window=4)(model):
        assert decoder._attn_implementation == NAME
        model(ids, **cache_kwargs(model, cache))
        oracle = duplicated_cache(cache)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        merged = model(cont, **cache_kwargs(model, cache)).logits
        monkeypatch.undo()
    assert model.config._attn_implementation == decoder._attn_implementation == "sdpa"
    biased = [c for c in calls if c[3] is not None and c[3].dtype != torch.bool]
    assert biased and all(q == 4 and kv == 2 and gqa for q, kv, gqa, _ in biased)  # never repeated to 4 heads
    with torch.no_grad():
        assert torch.allclose(merged, model(cont, **cache_kwargs(model, oracle)).logits, atol=1e-5)


def test_the_implementation_is_restored_when_the_block_raises():
    model = tiny("llama", "sdpa")
    with pytest.raises(RuntimeError, match="boom"), QuickMergePress(0.5)(model):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    with QuickMergePress(0.5, proportional=False)(model):  # no bias: nothing to adapt
        assert model.config._attn_implementation == "sdpa"
