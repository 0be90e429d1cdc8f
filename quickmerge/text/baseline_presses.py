"""Baseline KV-cache compressions written as presses, each only its own method and options.

``ToMeKVPress``: ToMe-style bipartite soft matching of each head's keys, size-weighted
averages of keys and values, proportional attention. ``RandomEvictionPress``: keep a
uniformly random subset of entries per head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..baselines.tome import tome_merge
from .kv_press import Compressed, KVPress


@dataclass
class ToMeKVPress(KVPress):
    """Bipartite soft matching on keys down to the kept count, per KV head.

    Args:
        compression_ratio: share of KV entries removed, in [0, 1).
        proportional: add log(group size) to merged entries' attention logits.
        max_round_share: share of the entries merged in one round (ToMe's 0.5 merges every even
            entry in a single round at ratio 0.5; 0.25, the default, keeps each round's best half
            of the matches). The first entry (the attention sink) is never merged away.
    """

    proportional: bool = True
    max_round_share: float = 0.25

    def adds_bias(self) -> bool:
        return self.proportional

    def merge(self, module: nn.Module, keys: Tensor, values: Tensor, scores: Tensor | None, kept: int) -> Compressed:
        b, hkv, length, d = keys.shape
        flat = torch.cat([keys, values], dim=-1).reshape(b * hkv, length, -1)
        merged, _, sizes = tome_merge(flat, kept, metric=keys.reshape(b * hkv, length, d), protect_first=True,
                                      max_round_share=self.max_round_share)
        merged = merged.view(b, hkv, kept, -1)
        sizes = sizes.view(b, hkv, kept).float() if self.proportional else None
        return Compressed(merged[..., :d], merged[..., d:], sizes)


@dataclass
class RandomEvictionPress(KVPress):
    """Keep ``kept`` uniformly random entries of each head (no merging, no bias).

    Args:
        compression_ratio: share of KV entries removed, in [0, 1).
        seed: seed of the per-layer generators (layer ``i`` uses ``seed + i``).
    """

    seed: int = 0

    def score(self, module: nn.Module, hidden_states: Tensor, keys: Tensor, values: Tensor, kwargs: dict) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed + int(module.layer_idx))
        return torch.rand(keys.shape[:3], generator=gen).to(keys.device)
