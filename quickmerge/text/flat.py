"""KV heads that keep different numbers of entries, at equal memory: the flat layout.

A Hugging Face cache layer is a rectangle ``[B, Hkv, K, d]``: every KV head keeps ``K``
entries. A copying head may need most of the prompt while its neighbours need a handful;
kvpress's AdaKV and KVzip give heads such budgets by *masking* evicted entries, so the
cache keeps its length and no memory is saved. Here a layer's kept entries are instead
folded into one row, ``[B, 1, T, d]`` with ``T = Hkv x K`` (the same memory as the
rectangle), each entry owned by one KV head; the cache hands attention the row as every KV
head's keys (a view, :func:`as_heads`), and a bias of ``-inf`` hides from each query head the
entries its KV head does not own, so eager and SDPA attention read it unchanged.
Decoding appends every new token's ``Hkv`` entries to the row, each owned by its head.

:func:`select_and_merge` chooses the ``T`` entries of a layer (the top scores over all its
heads together) and merges every other entry into its most similar kept entry of the same
head, as ``QuickMergePress`` does per head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..merging import merge_mass
from ..primitives import group_sum, top_indices, weighted_mean


class FlatMerge(NamedTuple):
    """``keys``/``values`` ``[B, T, d]``, ``sizes [B, T]`` (prompt entries each stands for) and
    ``owners [B, T]`` (the KV head of each entry; entries sorted by head, then position)."""

    keys: Tensor
    values: Tensor
    sizes: Tensor
    owners: Tensor


def select_and_merge(
    keys: Tensor, values: Tensor, scores: Tensor, ranks: Tensor, total: int, epsilon: float, chunk: int = 1024
) -> FlatMerge:
    """Keep the ``total`` best-scored (head, entry) pairs of each batch row, merge the rest in.

    Args:
        keys, values: ``[B, Hkv, L, d]`` a layer's prompt entries.
        scores: ``[B, Hkv, L]`` comparable across heads (e.g. attention probabilities); the top
            ``total`` of each batch row are kept.
        ranks: ``[B, Hkv, L]`` per-head saliency in (0, 1], the kept entries' merge mass.
        total: entries kept per batch row, over all heads (every head should hold at least one
            top score: give its attention sink the highest).
        epsilon: merge mass of the other entries (tiny: they barely move their group).
        chunk: rows of the similarity matrix computed at once (memory ``Hkv x chunk x L``).
    """
    b, hkv, length, d = keys.shape
    flat_scores = scores.reshape(b, hkv * length).float()
    top = top_indices(flat_scores, total)
    seed = torch.zeros_like(flat_scores, dtype=torch.bool).scatter_(1, top, True)  # [B, Hkv*L]
    # nearest kept entry of the same head, by cosine similarity of keys
    unit = F.normalize(keys.float(), dim=-1).reshape(b * hkv, length, d)
    is_seed = seed.view(b * hkv, length)
    nearest = torch.cat([
        torch.matmul(unit[:, i : i + chunk], unit.transpose(1, 2)).masked_fill(~is_seed[:, None], -torch.inf).argmax(-1)
        for i in range(0, length, chunk)
    ], dim=1)  # [B*Hkv, L]
    nearest = torch.where(is_seed, torch.arange(length, device=keys.device), nearest)
    slot = seed.long().cumsum(dim=1) - 1  # [B, Hkv*L]: each kept entry's place in the row (head-major)
    head_start = torch.arange(hkv, device=keys.device)[:, None] * length
    assignment = slot.gather(1, (nearest.view(b, hkv, length) + head_start).view(b, hkv * length))
    mass = merge_mass(seed.float(), ranks.reshape(b, hkv * length), epsilon)
    merged_k, _ = weighted_mean(keys.reshape(b, hkv * length, d), mass, assignment, total)
    merged_v, _ = weighted_mean(values.reshape(b, hkv * length, values.shape[-1]), mass, assignment, total)
    sizes = group_sum(torch.ones_like(mass)[..., None], assignment, total)[..., 0]
    owners = (torch.arange(hkv * length, device=keys.device) // length).expand(b, -1)
    owners = owners.masked_select(seed).view(b, total)
    return FlatMerge(merged_k, merged_v, sizes, owners)


def owner_bias(log_sizes: Tensor, owners: Tensor, heads: int, hkv: int) -> Tensor:
    """``[B, H, 1, T]``: ``log_sizes [B, T]`` where query head ``h`` owns the entry, ``-inf`` elsewhere.

    ``owners [B, T]`` are KV heads; query head ``h`` reads KV head ``h // (H / Hkv)``.
    """
    group = torch.arange(heads, device=owners.device) // (heads // hkv)  # [H]
    own = owners[:, None, :] == group[None, :, None]  # [B, H, T]
    return torch.where(own, log_sizes[:, None, :].float(), -torch.inf)[:, :, None, :]


def new_entries_bias(q_len: int, heads: int, hkv: int, device: torch.device) -> Tensor:
    """``[1, H, q, Hkv * q]``: which of ``q`` new tokens' flat entries (head-major) each query sees:
    its own KV head's entries up to its own position (0), nothing else (``-inf``)."""
    owner = torch.arange(hkv * q_len, device=device) // q_len
    when = torch.arange(hkv * q_len, device=device) % q_len
    group = torch.arange(heads, device=device) // (heads // hkv)
    step = torch.arange(q_len, device=device)
    visible = (owner[None, None, :] == group[:, None, None]) & (when[None, None, :] <= step[None, :, None])
    return torch.where(visible, 0.0, -torch.inf)[None]


def flatten_new(states: Tensor) -> Tensor:
    """``[B, Hkv, q, d]`` new keys or values -> ``[B, 1, Hkv * q, d]`` (head-major)."""
    b, hkv, q, d = states.shape
    return states.reshape(b, 1, hkv * q, d)


def as_heads(row: Tensor, hkv: int) -> Tensor:
    """``[B, 1, T, d]`` -> ``[B, Hkv, T, d]``, a view (no copy): the row as every KV head's keys or values, the
    shape every attention implementation expects; the owners' bias then hides from each head what it does not own."""
    return row.expand(-1, hkv, -1, -1)
