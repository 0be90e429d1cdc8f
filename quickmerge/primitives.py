"""Tensor primitives shared by the core, the presses, the vision merge and the baselines.

One home for each computation that several places need:

- :func:`group_sum` and :func:`weighted_mean`: tokens ``[B, N, C]`` summed or averaged into
  K groups given each token's group ``[B, N]`` (weights: sizes, merge masses, ones); :func:`gather_rows`, a
  group's row back for each token;
- :func:`normalized_entropy`, :func:`focus` and :func:`attention_received`: how much
  attention each key receives from a set of queries, each query weighted by how focused
  its attention is (QuickMerge++'s entropy-aware saliency);
- :func:`rank01`: ranks scaled to [0, 1], for scores whose scale carries no meaning;
- :func:`top_indices`: the k largest entries of each row.

Exact ties are broken the same way on every device: the lower index first (ranks: the lower index ranks higher).
``torch.topk`` and ``argsort`` pick among tied entries in their kernel's own order, which differs between the CPU
and CUDA kernels; ties are common where scores are max-pooled (plateaus) and in bf16 / fp16.

All are batched, keep the input's device and accumulate in at least float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_sum(values: Tensor, assignment: Tensor, k: int) -> Tensor:
    """Sum ``[B, N, C]`` values into ``[B, K, C]`` groups (``index_add`` over the flattened batch).

    ``assignment [B, N]`` holds each token's group in ``[0, K)``.
    """
    b, n, c = values.shape
    flat = (assignment + torch.arange(b, device=assignment.device)[:, None] * k).reshape(-1)
    return values.new_zeros(b * k, c).index_add(0, flat, values.reshape(b * n, c)).view(b, k, c)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``x[b, index[b, n]]`` of ``x [B, M, C]`` for ``index [B, N]`` in ``[0, M)``: ``[B, N, C]``.

    ``x.gather(1, index[..., None].expand(-1, -1, C))``, by ``index_select`` over the flattened batch, which copies
    whole rows (faster on a CPU than ``gather``'s element-wise indexing)."""
    b, m, c = x.shape
    flat = (index + torch.arange(b, device=index.device)[:, None] * m).reshape(-1)
    return x.reshape(b * m, c).index_select(0, flat).view(b, index.shape[1], c)


def weighted_mean(x: Tensor, weight: Tensor, assignment: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Weighted mean of each group: ``x~_g = sum_{j in g} w_j x_j / sum_{j in g} w_j``.

    Args:
        x: ``[B, N, C]`` tokens.
        weight: ``[B, N]`` positive weights (group sizes, merge masses, ...).
        assignment: ``[B, N]`` group of each token in ``[0, K)``, or ``-1`` for a dropped token.
        k: number of groups; every group must hold a token of positive weight.
    Returns:
        ``mean [B, K, C]`` in ``x``'s dtype (accumulated in at least float32) and the groups'
        total weights ``[B, K]`` in the accumulation dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    keep = assignment >= 0  # dropped tokens weigh nothing (no host sync to test for them)
    w, assignment = weight.to(acc) * keep, assignment.clamp_min(0)
    sums = group_sum(x.to(acc) * w[..., None], assignment, k)
    total = group_sum(w[..., None], assignment, k)[..., 0]
    return (sums / total[..., None]).to(x.dtype), total


def normalize_entropy(entropy: Tensor, support: Tensor | int) -> Tensor:
    """Entropy (nats) divided by ``log(support)``, in [0, 1]; rows that see a single key get 0.

    ``support`` is the number of keys each row may attend to, broadcast against ``entropy``.
    """
    support = torch.as_tensor(support, device=entropy.device)
    log_support = support.to(entropy.dtype).log()
    return torch.where(support > 1, entropy / log_support.clamp_min(1e-12), torch.zeros_like(entropy))


def normalized_entropy(probs: Tensor, support: Tensor | int) -> Tensor:
    """Entropy of each distribution over the last dim of ``probs``, normalised by its support, in [0, 1]."""
    return normalize_entropy(-torch.special.xlogy(probs, probs).sum(dim=-1), support)


def focus(probs: Tensor, support: Tensor | int) -> Tensor:
    """``1 - normalized_entropy``: 1 for a query that attends to one key, 0 for a uniform one."""
    return 1.0 - normalized_entropy(probs, support)


def attention_received(probs: Tensor, weight: Tensor) -> Tensor:
    """Attention each key receives, ``sum_q weight_q * probs_q``: ``[..., Q, N], [..., Q] -> [..., N]``."""
    return (weight[..., None] * probs).sum(dim=-2)


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices ``[..., k]`` of the k largest entries of each row (last dim), largest first; tied entries lowest
    index first, on every device (a stable descending sort)."""
    n = scores.shape[-1]
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, {n}] (the entries of a row), got {k}")
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def _ranks(scores: Tensor) -> Tensor:
    """Integer rank of each entry within its row (last dim), 0 = smallest, tied entries the lower index higher
    (so a top-k of ranks picks what :func:`top_indices` picks): one stable sort and a scatter, half the cost of
    ``argsort().argsort()``."""
    n = scores.shape[-1]
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    ranks = torch.arange(n - 1, -1, -1, device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def quantile_rank(scores: Tensor) -> Tensor:
    """Rank of each entry within its row (last dim) as a quantile in (0, 1] (1 = largest), float32."""
    return (_ranks(scores) + 1).to(torch.float32) / scores.shape[-1]


def rank01(scores: Tensor) -> Tensor:
    """Rank of each entry within its row scaled to [0, 1] (0 = smallest), ``[B, n]`` float32."""
    n = scores.shape[-1]
    return _ranks(scores).to(torch.float32) / max(n - 1, 1)
