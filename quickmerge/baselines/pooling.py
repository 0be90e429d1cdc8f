"""Uniform pooling and random dropping: the simplest ways to keep K of N tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from ..primitives import gather_rows, weighted_mean


def uniform_pool(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Average ``x [B, N, D]`` over K contiguous spans of (nearly) equal length.

    Returns ``merged [B, K, D]``, ``assignment [B, N]`` and ``sizes [B, K]``.
    """
    b, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= N={n}, got {k}")
    assignment = (torch.arange(n, device=x.device) * k // n).expand(b, n)
    merged, sizes = weighted_mean(x, torch.ones(b, n, device=x.device), assignment, k)
    return merged, assignment, sizes.long()


def random_drop(x: Tensor, k: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Keep K tokens chosen uniformly at random (in order); returns ``kept [B, K, D]`` and ``index [B, K]``."""
    b, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= N={n}, got {k}")
    noise = torch.rand(b, n, generator=generator, device="cpu" if generator is None else generator.device)
    index = noise.to(x.device).topk(k, dim=-1).indices.sort(dim=-1).values
    return gather_rows(x, index), index
