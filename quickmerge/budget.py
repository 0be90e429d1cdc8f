"""How many tokens to keep: a fixed share of N, or an entropy-based budget that depends on the input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._validation import check_real


def tokens_for_budget(n: int, budget: float) -> int:
    """``K = max(1, round(N * budget))`` for a keep share ``budget`` in (0, 1]."""
    budget = check_real(budget, "entropy_budget", low=0.0, high=1.0, low_open=True, high_open=False)
    return max(1, min(n, round(n * budget)))


def adaptive_tokens(saliency: Tensor, budget: float) -> Tensor:
    """Entropy-based budget ``[B]``: ``K_b = max(1, round(budget * exp(H(p_b))))``.

    ``p_b = s_b / sum(s_b)`` is the saliency distribution and ``exp(H)`` its
    perplexity, the effective number of salient tokens: N when saliency is flat,
    few when it concentrates. So K never exceeds the fixed budget ``budget * N``
    and shrinks for inputs whose information sits in few tokens.

    Args:
        saliency: ``[B, N]`` non-negative scores.
        budget: keep share in (0, 1].
    """
    budget = check_real(budget, "entropy_budget", low=0.0, high=1.0, low_open=True, high_open=False)
    p = saliency.float().clamp_min(0)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum(dim=-1))
    return (budget * perplexity).round().clamp(1, saliency.shape[-1]).long()


def allocate(total: int, weights: Sequence[float], capacity: Sequence[int], floor: Sequence[int]) -> list[int]:
    """Split ``total`` items over parts in proportion to ``weights``, within ``[floor, capacity]``.

    Every part first gets its ``floor``; the rest is shared in proportion to the weights,
    parts that reach their ``capacity`` pass their excess on (water-filling), and the
    fractional shares are rounded so the parts sum to ``total`` exactly (largest remainder).

    Raises ValueError if ``total`` lies outside ``[sum(floor), sum(capacity)]``.
    """
    n = len(weights)
    if not (len(capacity) == len(floor) == n) or n == 0:
        raise ValueError("weights, capacity and floor must be non-empty and of one length")
    if any(w < 0 for w in weights) or any(f > c for f, c in zip(floor, capacity, strict=True)):
        raise ValueError("weights must be >= 0 and floor <= capacity")
    if not sum(floor) <= total <= sum(capacity):
        raise ValueError(f"total must lie in [{sum(floor)}, {sum(capacity)}], got {total}")
    share = [float(f) for f in floor]
    free = [i for i in range(n) if share[i] < capacity[i]]
    left = float(total - sum(floor))
    while left > 1e-9 and free:
        mass = sum(weights[i] for i in free) or float(len(free))
        give = {i: left * ((weights[i] if sum(weights[j] for j in free) else 1.0) / mass) for i in free}
        left = 0.0
        for i, g in give.items():
            room = capacity[i] - share[i]
            share[i] += min(g, room)
            left += max(0.0, g - room)
        free = [i for i in free if share[i] < capacity[i] - 1e-9]
    out = [int(s) for s in share]
    order = sorted(range(n), key=lambda i: share[i] - out[i], reverse=True)
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out
