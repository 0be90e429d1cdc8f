"""Baseline KV-cache compressions in the same press framework as ``QuickMergePress``.

``ToMeKVPress``: ToMe-style bipartite soft matching of each head's keys, size-weighted
averages of keys and values, proportional attention. ``RandomEvictionPress``: keep a
uniformly random subset of entries per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..baselines.tome import tome_merge
from .hf_causal_lm import QuickMergePress


@dataclass
class ToMeKVPress(QuickMergePress):
    """Bipartite soft matching on keys down to the kept count, per KV head."""

    def score(self, module, hidden_states, keys, kwargs) -> Tensor:
        return torch.zeros(keys.shape[:3], device=keys.device)

    def merge(self, keys: Tensor, values: Tensor, saliency: Tensor, kept: int) -> tuple[Tensor, Tensor, Tensor]:
        b, hkv, length, d = keys.shape
        flat = torch.cat([keys, values], dim=-1).reshape(b * hkv, length, -1)
        merged, _, sizes = tome_merge(flat, kept, metric=keys.reshape(b * hkv, length, d))
        merged = merged.view(b, hkv, kept, -1)
        return merged[..., :d], merged[..., d:], sizes.view(b, hkv, kept).float()


@dataclass
class RandomEvictionPress(QuickMergePress):
    """Keep ``kept`` uniformly random entries of each head (no merging, no bias)."""

    seed: int = 0
    proportional: bool = False

    def score(self, module, hidden_states, keys, kwargs) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + int(module.layer_idx))
        return torch.rand(keys.shape[:3], generator=gen).to(keys.device)

    def merge(self, keys: Tensor, values: Tensor, saliency: Tensor, kept: int) -> tuple[Tensor, Tensor, Tensor]:
        index = saliency.topk(kept, dim=-1).indices.sort(dim=-1).values[..., None]
        keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1]))
        values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1]))
        return keys, values, torch.ones(index.shape[:3], device=keys.device)
