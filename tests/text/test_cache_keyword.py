"""quickmerge.text.cache.cache_kwargs: the cache keyword of the installed transformers release."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text.cache import cache_kwargs  # noqa: E402
from tests.text.tiny import tiny  # noqa: E402


def _release() -> tuple[int, int]:
    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


def test_cache_keyword_follows_the_release_and_fills_the_cache_without_a_deprecation():
    model = tiny("llama", layers=2)
    cache = transformers.DynamicCache()
    kwargs = cache_kwargs(model, cache)
    assert list(kwargs) == (["cache"] if _release() >= (5, 24) else ["past_key_values"])
    assert cache_kwargs(model.model, cache).keys() == kwargs.keys()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        model(torch.randint(0, 97, (1, 9)), **kwargs)
    assert cache.get_seq_length() == 9
    assert not [w for w in caught if "past_key_values" in str(w.message)]


def test_a_model_without_a_cache_keyword_is_refused():
    with pytest.raises(TypeError, match="neither cache= nor past_key_values="):
        cache_kwargs(torch.nn.Linear(2, 2), None)
