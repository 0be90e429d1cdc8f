"""quickmerge.eval.stats: the bootstrap intervals every table's paired comparisons use."""

import math

import pytest
import torch

from quickmerge.eval import stats


def one_shot(values: list[float], samples: int, seed: int) -> torch.Tensor:
    """The resampled means drawn at once, as every interval published before stop 84 drew them."""
    x = torch.tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return x[torch.randint(0, len(x), (samples, len(x)), generator=gen)].mean(dim=1)


@pytest.mark.parametrize(("n", "samples", "limit"), [(37, 101, 1000), (1000, 2000, 4096), (5, 7, 1)])
def test_resampled_means_in_row_chunks_are_the_draws_at_once(monkeypatch, n, samples, limit):
    """Chunks (27 rows, 4 rows, 1 row: the last one partial) take the same draws from the generator."""
    values = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    monkeypatch.setattr(stats, "_ENTRIES_PER_CHUNK", limit)
    chunked = stats.resampled_means(torch.tensor(values, dtype=torch.float64), samples=samples, seed=3)
    assert torch.equal(chunked, one_shot(values, samples, 3))
    low, high = torch.quantile(one_shot(values, samples, 3), torch.tensor([0.025, 0.975], dtype=torch.float64))
    mean = float(torch.tensor(values, dtype=torch.float64).mean())
    assert stats.bootstrap_mean(values, samples=samples, seed=3) == (mean, low.item(), high.item())


def test_no_draw_holds_more_than_the_chunk_limit(monkeypatch):
    drawn = []
    randint = torch.randint

    def spy(*args, **kwargs):
        out = randint(*args, **kwargs)
        drawn.append(out.numel())
        return out

    monkeypatch.setattr(torch, "randint", spy)
    stats.bootstrap_mean([0.0, 1.0] * 5000)  # 2,000 resamples of 10,000: 20M entries at once before
    assert sum(drawn) == 2000 * 10_000 and max(drawn) <= stats._ENTRIES_PER_CHUNK and len(drawn) == 5


def test_bootstrap_mean_and_difference():
    assert stats.bootstrap_mean([0.25] * 50) == (0.25, 0.25, 0.25)  # no spread, no interval
    hits = [1.0, 0.0] * 500
    mean, low, high = stats.bootstrap_mean(hits)
    half_width = 1.96 * math.sqrt(0.25 / 1000)  # the normal approximation of a 50% accuracy over 1,000 examples
    assert mean == 0.5 and low < 0.5 < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    base = [0.0] * 1000
    assert stats.bootstrap_difference(hits, base) == (mean, low, high)  # paired: the mean of the differences
    shifted = stats.bootstrap_difference([h + 2.0 for h in hits], [2.0] * 1000)
    assert shifted == pytest.approx((mean, low, high), abs=1e-12)
    with pytest.raises(ValueError):
        stats.bootstrap_difference(hits, base[:10])


def test_perplexity_and_paired_ratio():
    nll = torch.rand(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64).add(1.0).tolist()
    ppl, low, high = stats.bootstrap_ppl(nll)
    assert ppl == pytest.approx(math.exp(sum(nll) / 200), rel=1e-12) and low < ppl < high
    # the same resamples: exp of the mean NLL's percentiles (up to the percentiles' interpolation between two draws)
    assert (low, high) == pytest.approx(tuple(math.exp(v) for v in stats.bootstrap_mean(nll)[1:]), rel=1e-6)
    ratio = stats.bootstrap_ratio([v + 0.1 for v in nll], nll)  # every example 0.1 nats worse: exactly e^0.1
    assert ratio == pytest.approx((math.exp(0.1),) * 3, rel=1e-12)
    assert stats.bootstrap_ratio(nll, nll) == (1.0, 1.0, 1.0)
