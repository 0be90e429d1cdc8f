"""Merging a layer's KV cache again while the model decodes (kvpress's ``DecodingPress``, with merging).

A long generation grows the cache one entry per token and layer. With ``decoding_size=T`` a
:class:`~quickmerge.text.quickmerge_press.QuickMergePress` merges a layer back to ``T`` entries per KV head
whenever decoding has filled it to ``T + decoding_interval``:

- the last ``decoding_window`` decoded tokens' queries (a third of ``T`` by default) are recomputed from the
  layer's projections (only over the steps just before a merge is due, :class:`QueryBuffer`; kept on the cache
  layer, so beam search reorders them with its rows) and score every entry by the attention they pay it, each query
  weighted by its focus (the prefill's entropy saliency, :func:`~quickmerge.text.scoring.saliency`); their own
  entries rank first;
- the ``T`` best entries seed groups, every other entry joins its most similar seed (cosine of keys), and each
  group becomes the mean of its members' keys and values weighted by merge mass times the tokens each member
  already stands for; the group's size is the sum of its members' (proportional attention reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..merging import assign_to_seeds, merge_mass
from ..primitives import group_sum, top_indices, weighted_mean
from .decoder import key_rotation, window_queries
from .scoring import Salient, saliency, window_of


@dataclass
class QueryBuffer:
    """Buffers the last ``window`` post-RoPE queries ``[B, H, w, d]`` (float32) decoded into a full-attention layer,
    only once the layer is within ``window`` entries of its next merge. They are kept on the cache layer itself
    (``decoded_queries`` of a merged layer, :mod:`quickmerge.text.cache`), so that every reordering of the batch's
    rows (beam search's ``reorder_cache``) carries them with the rows they were decoded in."""

    rotations: dict[int, str] = field(default_factory=dict)  # each layer's key rotation (decoder.key_rotation)

    def add(self, layer: Any, module: nn.Module, hidden_states: Tensor, kwargs: dict, window: int) -> None:
        """Buffer the queries of this call's tokens ``hidden_states [B, q, D]`` on ``layer`` (a merged cache layer
        after the call: its last ``q`` entries are these tokens'), keeping the last ``window``."""
        index = module.layer_idx
        if index not in self.rotations:
            self.rotations[index] = key_rotation(module, hidden_states, layer.keys, kwargs.get("position_embeddings"))
        q = window_queries(module, hidden_states[:, -window:], kwargs, self.rotations[index]).float()
        old = layer.decoded_queries
        layer.decoded_queries = q if old is None else torch.cat([old, q], dim=2)[:, :, -window:]

    def clear(self) -> None:
        self.rotations = {}


def remerge(
    module: nn.Module, keys: Tensor, values: Tensor, sizes: Tensor, queries: Tensor, kept: int, *,
    log_sizes: Tensor | None, epsilon: float, salient: Salient, kernel_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge a decoding layer's ``[B, Hkv, L, d]`` keys and values into ``kept`` entries per KV head.

    Args:
        sizes: ``[B, Hkv, L]`` tokens each entry stands for (1 for an entry never merged).
        queries: ``[B, H, w, d]`` the last ``w`` decoded tokens' queries; the ``w`` last entries are theirs.
        log_sizes: ``[B, H, 1, L]`` the proportional-attention bias those queries attended with, or None.
        epsilon: merge mass of the entries that do not seed a group.
        salient, kernel_size: how queries are weighted and scores spread (as in the prefill's saliency).
    Returns:
        keys ``[B, Hkv, kept, d]``, values, and sizes ``[B, Hkv, kept]`` (sums of the members' sizes); the groups
        are in the order of their seeds' positions.
    """
    b, hkv, length, d = keys.shape
    win = window_of(module, queries, keys, log_sizes)
    ranks = saliency(win, hkv, salient=salient, kernel_size=kernel_size)
    flat_k = keys.reshape(b * hkv, length, d)
    flat_v = values.reshape(b * hkv, length, values.shape[-1])
    s = ranks.reshape(b * hkv, length)
    n = sizes.reshape(b * hkv, length).float()
    top = top_indices(s, kept)
    mask = torch.zeros_like(s).scatter_(1, top, 1.0)
    assignment = assign_to_seeds(flat_k, mask.bool(), top.sort(dim=-1).values)
    weight = merge_mass(mask, s, epsilon) * n
    merged_k, _ = weighted_mean(flat_k, weight, assignment, kept)
    merged_v, _ = weighted_mean(flat_v, weight, assignment, kept)
    merged_sizes = group_sum(n[..., None], assignment, kept)[..., 0]
    return (merged_k.view(b, hkv, kept, d), merged_v.view(b, hkv, kept, values.shape[-1]),
            merged_sizes.view(b, hkv, kept))


def entry_sizes(log_sizes: Tensor | None, hkv: int, length: int, like: Tensor) -> Tensor:
    """``[B, Hkv, L]`` tokens each of a layer's ``length`` entries stands for: its merged entries' (from the
    ``[B, H, 1, K]`` proportional-attention bias, one row per KV head), 1 for the ``length - K`` entries decoded
    since, and for every entry of a layer never merged (``log_sizes`` None)."""
    if log_sizes is None:
        return torch.ones(like.shape[0], hkv, length, device=like.device)
    b, heads, _, merged = log_sizes.shape
    sizes = log_sizes[:, :: heads // hkv, 0].float().exp()  # the query heads of a KV head share its bias
    return torch.cat([sizes, sizes.new_ones(b, hkv, length - merged)], dim=-1)
