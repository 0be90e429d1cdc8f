"""How many tokens to keep: a fixed share of N, or an entropy-based budget that depends on the input."""

from __future__ import annotations

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
