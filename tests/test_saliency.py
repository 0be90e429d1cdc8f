import itertools
import math

import pytest
import torch

from quickmerge import EntropyAwareSaliency, attention_entropy, qk_attention_entropy, saliency_from_attentions
from quickmerge import saliency as saliency_module
from quickmerge.saliency import landmark_counts, normalise_per_sequence

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_entropy_of_uniform_and_one_hot_rows():
    uniform = torch.full((1, 2, 5, 5), 0.2)
    assert torch.allclose(attention_entropy(uniform), torch.ones(1, 5))
    one_hot = torch.eye(5).expand(1, 2, 5, 5)
    assert torch.allclose(attention_entropy(one_hot), torch.zeros(1, 5))


def test_entropy_normalised_by_causal_support():
    n = 6
    causal_uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    ent = attention_entropy(causal_uniform.expand(2, 3, n, n))
    assert ent[0, 0] == 0  # the first token can only attend to itself
    assert torch.allclose(ent[:, 1:], torch.ones(2, n - 1), atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_qk_entropy_matches_explicit_softmax_with_gqa_and_chunks(causal, monkeypatch):
    b, h, hkv, n, d = 2, 4, 2, 9, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d)
    logits = q @ k.repeat_interleave(h // hkv, dim=1).transpose(-1, -2) / math.sqrt(d)
    if causal:
        logits = logits.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), float("-inf"))
    expected = attention_entropy(logits.softmax(-1))
    monkeypatch.setattr(saliency_module, "_CHUNK_ELEMENTS", b * h * n * 2)  # force several row chunks
    assert torch.allclose(qk_attention_entropy(q, k, causal=causal), expected, atol=1e-5)


def test_saliency_is_mean_of_normalised_layers_and_streams():
    maps = [torch.rand(2, 3, 7, 7).softmax(-1) for _ in range(4)]
    expected = torch.stack([normalise_per_sequence(attention_entropy(m)) for m in maps]).mean(0)
    streamed = saliency_from_attentions((m for m in maps), salient="high_entropy")
    assert torch.allclose(streamed, expected, atol=1e-6)
    assert torch.allclose(saliency_from_attentions(maps, salient="low_entropy"), 1 - expected, atol=1e-6)
    assert streamed.min() >= 0 and streamed.max() <= 1


def test_x_only_layers_are_genuinely_different():
    est = EntropyAwareSaliency(32, num_layers=5, max_landmarks=40, min_landmarks=4)
    x = torch.randn(2, 40, 32)
    per_layer = list(est._multiscale_entropies(x))
    assert len(per_layer) == 5
    for a, b in itertools.pairwise(per_layer):
        assert not torch.allclose(a, b)
    s = est(x)
    assert s.shape == (2, 40) and s.min() >= 0 and s.max() <= 1


def test_landmark_counts_geometric_and_capped():
    assert landmark_counts(1024, 3, 16, 256) == [256, 64, 16]
    assert landmark_counts(10, 4, 16, 256) == [10, 10, 10, 10]
    assert landmark_counts(100, 1, 16, 256) == [100]


def test_saliency_from_queries_keys_and_shape_errors():
    est = EntropyAwareSaliency(16, num_layers=2)
    x = torch.randn(1, 5, 16)
    qs = [torch.randn(1, 2, 5, 4) for _ in range(2)]
    ks = [torch.randn(1, 2, 5, 4) for _ in range(2)]
    assert est(x, queries=qs, keys=ks, causal=True).shape == (1, 5)
    with pytest.raises(ValueError, match="queries and keys"):
        est(x, queries=qs)
    with pytest.raises(ValueError, match="attentions"):
        est(x, [torch.rand(1, 2, 6, 6).softmax(-1)])
    with pytest.raises(ValueError, match=r"\[B, H, N, M\]"):
        est(x, [torch.rand(5, 5)])
    with pytest.raises(ValueError, match="at least one layer"):
        est(x, [])


def test_half_precision_input_gives_float32_saliency():
    est = EntropyAwareSaliency(16, num_layers=3)
    x = torch.randn(2, 12, 16)
    for dtype in (torch.float16, torch.bfloat16):
        s = est(x.to(dtype))
        assert s.dtype == torch.float32
        assert (s - est(x)).abs().max() < 0.1
