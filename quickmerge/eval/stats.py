"""Bootstrap confidence intervals for perplexities."""

from __future__ import annotations

import math

import torch


def bootstrap_ppl(nll: list[float], *, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Perplexity ``exp(mean NLL)`` over examples and its 95% percentile-bootstrap interval."""
    x = torch.tensor(nll, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(x), (samples, len(x)), generator=gen)
    means = x[idx].mean(dim=1).exp()
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float(x.mean())), low, high


def bootstrap_ratio(
    nll: list[float], base: list[float], *, samples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Paired ratio ``ppl / ppl_base`` over the same examples, with its 95% bootstrap interval."""
    diff = torch.tensor(nll, dtype=torch.float64) - torch.tensor(base, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (samples, len(diff)), generator=gen)
    ratios = diff[idx].mean(dim=1).exp()
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return math.exp(float(diff.mean())), low, high


def bootstrap_mean(values: list[float], *, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean (an accuracy, for 0/1 values) over examples and its 95% percentile-bootstrap interval."""
    x = torch.tensor(values, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    means = x[torch.randint(0, len(x), (samples, len(x)), generator=gen)].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(x.mean()), low, high


def bootstrap_difference(values: list[float], base: list[float], *, samples: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """Paired difference of means ``mean(values) - mean(base)`` over the same examples, 95% bootstrap interval."""
    return bootstrap_mean([a - b for a, b in zip(values, base, strict=True)], samples=samples, seed=seed)
