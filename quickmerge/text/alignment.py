"""Autoregressive alignment at inference: merged entries fitted to what the prompt's last queries read.

QuickMerge++'s bidirectional AR loss asks the merged sequence to keep what comes before and
after it predictable. At inference, with no training, the observation window is the check
of a merge: the merged keys and values should reproduce what the window's queries read from
the full cache.

- Keys (what a query reads *from*): with proportional attention, a group ``g`` of ``n_g``
  entries contributes ``n_g exp(s q.k~_g)`` to a query's softmax; the full cache gave
  ``sum_{j in g} exp(s q.k_j)``. The merged key is the group's mean plus the ridge-regularised
  correction ``Delta`` that makes ``s q.k~_g = logsumexp_j(s q.k_j) - log n_g`` hold in the
  least-squares sense over the window's queries (one ``d x d`` solve per head, shared by all
  groups).
- Values (what it reads): each member's value weighs by the attention it receives from the
  window (plus a floor), so the group's value is the one those queries would have read.

A logit cap ``c`` (Gemma 2: ``c tanh(x / c)`` before the mask adds ``log n_g``) is followed by
fitting in the capped domain and mapping the target back through ``c atanh(. / c)``; per-head
sink logits (gpt-oss) share each query's softmax in the read weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..primitives import weighted_mean
from .scoring import soft_capped, softmax_with_sinks


def fit_keys(
    keys: Tensor, assignment: Tensor, mean_keys: Tensor, sizes: Tensor, queries: Tensor, scale: float, ridge: float,
    softcap: float | None = None,
) -> Tensor:
    """Merged keys ``[R, K, d]`` that keep each group's log-sum-exp for ``queries``.

    Args:
        keys: ``[R, L, d]`` the entries (R = batch x KV heads); assignment: ``[R, L]`` group in ``[0, K)``.
        mean_keys: ``[R, K, d]`` the groups' mean keys (the starting point).
        sizes: ``[R, K]`` entries per group (their log enters the softmax through proportional attention).
        queries: ``[R, M, d]`` the window queries that read this head.
        scale: the attention's logit scale. ridge: regularisation relative to the queries' energy.
        softcap: the attention's logit cap ``c`` (``c tanh(x / c)``), or None.
    """
    r, _, d = keys.shape
    k = mean_keys.shape[1]
    q = queries.float()
    logits = soft_capped(scale * torch.matmul(q, keys.float().transpose(1, 2)), softcap)  # [R, M, L]
    top = logits.amax(dim=-1, keepdim=True)
    exp = (logits - top).exp()
    group = torch.zeros(r, q.shape[1], k, device=keys.device).scatter_add_(
        2, assignment[:, None, :].expand(-1, q.shape[1], -1), exp
    )
    target = group.clamp_min(1e-30).log() + top - sizes.float().log()[:, None, :]  # [R, M, K]
    if softcap:  # the uncapped logit whose cap is the target (the nearest one a cap can give)
        target = softcap * torch.atanh((target / softcap).clamp(-1 + 1e-4, 1 - 1e-4))
    residual = target - scale * torch.matmul(q, mean_keys.float().transpose(1, 2))
    gram = scale**2 * torch.matmul(q.transpose(1, 2), q)  # [R, d, d]
    damping = ridge * gram.diagonal(dim1=1, dim2=2).mean(dim=-1).clamp_min(1e-6)
    system = gram + damping[:, None, None] * torch.eye(d, device=keys.device)
    delta = torch.linalg.solve(system, scale * torch.matmul(q.transpose(1, 2), residual))  # [R, d, K]
    return (mean_keys.float() + delta.transpose(1, 2)).to(keys.dtype)


def read_weights(
    keys: Tensor, queries: Tensor, scale: float, floor: float, softcap: float | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """``[R, L]`` weight of each entry's value: the attention the window's queries pay it (their
    softmax over all entries, summed over queries), plus ``floor`` times its mean.

    ``softcap``: the logit cap, or None; ``sinks [R, M]``: each query's sink logit sharing its softmax, or None."""
    logits = soft_capped(scale * torch.matmul(queries.float(), keys.float().transpose(1, 2)), softcap)  # [R, M, L]
    probs = softmax_with_sinks(logits, None if sinks is None else sinks[..., None])
    received = probs.sum(dim=1)
    return received + floor * received.mean(dim=-1, keepdim=True)


def fit_values(values: Tensor, assignment: Tensor, k: int, weights: Tensor) -> Tensor:
    """Merged values ``[R, K, dv]``: each group's members averaged by ``weights [R, L]``."""
    return weighted_mean(values, weights, assignment, k)[0]
