"""Budgets from entropy: how many tokens each block keeps, from how widely its attention spreads.

QuickMerge++ sizes a budget by the effective number of tokens attention uses, ``exp(H)``
(the perplexity of the attention distribution). For a whole ViT this gives a per-block
schedule: :func:`block_attention_perplexity` measures, on calibration images, the effective
number of patch tokens the class token attends to in each block (a model without one: the patch
tokens' own attention, averaged over them); :func:`entropy_schedule`
merges in inverse proportion to it (blocks that attend narrowly merge more, blocks that
attend widely fewer), scaled so the schedule costs what a constant-``r`` schedule costs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from .patch import patch

# (block, q, k, scale, valid): q and k [B, H, N, hd]; valid [B, N] bool (False: padding) or None (no padding)
Observer = Callable[[int, Tensor, Tensor, float, "Tensor | None"], None]
DEFAULT_FLOOR = 8  # fewest tokens a block leaves in a schedule (a greedy one would otherwise reach a single token)


@torch.inference_mode()
def block_attention_perplexity(model: nn.Module, images: Tensor | Mapping[str, Tensor], *,
                               batch_size: int = 256) -> list[float]:
    """Per block, the mean ``exp(entropy)`` of the class token's (or every patch token's) attention over patch tokens.

    ``images``: model-ready inputs ``[N, C, H, W]``, or a mapping of the model's keyword inputs, each ``[N, ...]``
    (a SigLIP 2 NaFlex batch: ``pixel_values``, ``pixel_attention_mask``, ``spatial_shapes``). Averaged over heads and
    images; measured on the unmerged model (``r = 0``). A model without a class token has no query that reads for
    the head: there every patch token's attention over the patch tokens is measured and averaged over the queries
    too. Padding (a NaFlex batch) is neither a query nor a key: a padded image gives its real tokens' perplexity.
    """
    if isinstance(images, Mapping):
        if not images or not all(isinstance(v, Tensor) for v in images.values()):
            raise TypeError("images must be a tensor or a non-empty mapping of the model's tensor inputs, got "
                            f"{ {k: type(v).__name__ for k, v in images.items()} }")
        lengths = {k: len(v) for k, v in images.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"images: every input must hold the same number of images, got {lengths}")
        total = next(iter(lengths.values()))
    else:
        total = len(images)
    sums: dict[int, float] = {}
    count = 0
    with patch(model, r=0) as handle:
        prefix = handle.num_prefix_tokens
        observe = _class_token_perplexity(sums, prefix) if handle.has_class_token else _patch_perplexity(sums, prefix)
        handle._observers.append(observe)
        device = next(model.parameters()).device
        for i in range(0, total, batch_size):
            if isinstance(images, Mapping):
                model(**{k: v[i : i + batch_size].to(device) for k, v in images.items()})
            else:
                model(images[i : i + batch_size].to(device))
            count += min(batch_size, total - i)
    return [sums[layer] / count for layer in sorted(sums)]


def _masked_logits(logits: Tensor, keys_valid: Tensor | None) -> Tensor:
    """``logits [b, H, q, n]`` with padding keys (``keys_valid [b, n]`` False) at -inf."""
    if keys_valid is None:
        return logits
    return logits.masked_fill(~keys_valid[:, None, None, :], float("-inf"))


def _class_token_perplexity(sums: dict[int, float], prefix: int) -> Observer:
    """An observer adding each image's class-token attention perplexity (mean over heads) to ``sums[layer]``."""

    def observe(layer: int, q: Tensor, k: Tensor, scale: float, valid: Tensor | None) -> None:
        logits = torch.matmul(q[:, :, :1].float(), k[:, :, prefix:].float().transpose(-1, -2)) * scale
        keys_valid = None if valid is None else valid[:, prefix:]
        p = _masked_logits(logits, keys_valid).softmax(dim=-1)[:, :, 0]  # [B, H, n] over patch tokens
        entropy = -torch.special.xlogy(p, p).sum(dim=-1)  # [B, H] nats
        sums[layer] = sums.get(layer, 0.0) + float(entropy.exp().mean(dim=1).sum())

    return observe


_LOGITS_PER_CHUNK = 1 << 22  # [b, H, n, n] attention entries held at once: every query of a long sequence is many


def _patch_perplexity(sums: dict[int, float], prefix: int) -> Observer:
    """An observer adding each image's patch-token attention perplexity (mean over heads and real patch queries) to
    ``sums[layer]``, in chunks of images so that a long sequence's ``[b, H, n, n]`` attention stays small."""

    def observe(layer: int, q: Tensor, k: Tensor, scale: float, valid: Tensor | None) -> None:
        b, h, n = q.shape[0], q.shape[1], q.shape[2] - prefix
        step = max(1, _LOGITS_PER_CHUNK // (h * n * n))
        for i in range(0, b, step):
            qs, ks = q[i : i + step, :, prefix:].float(), k[i : i + step, :, prefix:].float()
            real = None if valid is None else valid[i : i + step, prefix:]
            p = _masked_logits(torch.matmul(qs, ks.transpose(-1, -2)) * scale, real).softmax(dim=-1)  # [b, H, n, n]
            perplexity = (-torch.special.xlogy(p, p).sum(dim=-1)).exp().mean(dim=1)  # [b, n], over heads
            # padding queries left out
            per_image = perplexity.mean(dim=1) if real is None else (perplexity * real).sum(dim=1) / real.sum(dim=1)
            sums[layer] = sums.get(layer, 0.0) + float(per_image.sum())

    return observe


def token_counts(num_tokens: int, merges: list[float], floor: int = DEFAULT_FLOOR, *,
                 bipartite: bool = True) -> list[int]:
    """Tokens entering each block and leaving the last ``[L + 1]`` when block l asks to merge ``merges[l]``.

    Each block leaves at least ``floor`` tokens and, with ``bipartite`` (ToMe's matching and QuickMerge++'s
    default), merges at most half of its tokens; ``matching="greedy"`` has no such cap (``bipartite=False``).
    """
    counts = [num_tokens]
    for want in merges:
        before = counts[-1]
        left = max(before - round(want), (before + 1) // 2 if bipartite else 0, min(floor, before))
        counts.append(min(before, left))
    return counts


def constant_schedule(num_tokens: int, r: int, num_layers: int, floor: int = DEFAULT_FLOOR, *,
                      bipartite: bool = True) -> list[int]:
    """Tokens merged in each block ``[L]`` when every block asks for ``r``, within :func:`token_counts`' limits.

    With ``bipartite=False`` (greedy matching) this is how a constant r runs past half the tokens: the first
    blocks merge r each, until only ``floor`` tokens are left.
    """
    counts = token_counts(num_tokens, [float(r)] * num_layers, floor, bipartite=bipartite)
    return [counts[i] - counts[i + 1] for i in range(num_layers)]


def schedule_cost(counts: list[int]) -> int:
    """Token-blocks a schedule costs: ``sum_l (N_l + N_{l+1})``, what each block's attention and MLP see."""
    return sum(counts[i] + counts[i + 1] for i in range(len(counts) - 1))


def entropy_schedule(perplexity: list[float], num_tokens: int, r: int | None = None, *, cost: float | None = None,
                     floor: int = DEFAULT_FLOOR, bipartite: bool = True) -> list[int]:
    """Tokens merged in each block ``[L]``, in inverse proportion to ``perplexity``, at a constant-r cost.

    Args:
        perplexity: effective tokens attended in each of the L blocks (:func:`block_attention_perplexity`).
        num_tokens: mergeable tokens entering the first block (patch tokens).
        r: the constant schedule whose cost to match: ``sum_l (N_l + N_{l+1})``, the tokens each
            block's attention and MLP see.
        cost: instead of ``r``, the share of the unmerged model's cost to spend, in (0, 1] (0.5: half the
            token-blocks; what a share of the compute means at a given r depends on the model, so ask in cost).
        floor: fewest tokens any block keeps.
        bipartite: a block merges at most half of its tokens (ToMe's cap; False for greedy matching).
    A block whose attention uses few tokens (low entropy) can lose many without losing what
    it reads, so block l merges ``c / perplexity[l]`` tokens, at most half of those present
    (with ``bipartite``) and never below ``floor`` left; ``c`` is found by bisection so the
    cost is the constant schedule's (up to rounding, never above it). Flat perplexity gives
    the constant schedule back. A ``cost`` below what the schedule can reach (every block at its cap or
    floor) raises ValueError naming the least it can spend.
    """
    layers = len(perplexity)
    if (r is None) == (cost is None):
        raise ValueError(f"give exactly one of r (tokens per block) and cost (a share of the unmerged cost), got "
                         f"r={r!r}, cost={cost!r}")
    if cost is not None and not (isinstance(cost, (int, float)) and not isinstance(cost, bool) and 0 < cost <= 1):
        raise ValueError(f"cost must be a share of the unmerged model's token-blocks in (0, 1], got {cost!r}")
    if layers == 0 or num_tokens < 1 or (r is not None and r < 0):
        raise ValueError(f"need at least one block, num_tokens >= 1 and r >= 0, got {layers}, {num_tokens}, {r}")
    if min(perplexity) <= 0:
        raise ValueError("perplexity values must be positive")
    weights = [min(perplexity) / p for p in perplexity]  # 1 for the most focused block

    def counts_for(merges: list[float]) -> list[int]:
        return token_counts(num_tokens, merges, floor, bipartite=bipartite)

    if r is not None:
        budget = schedule_cost(counts_for([float(r)] * layers))
    else:
        budget = int(cost * schedule_cost([num_tokens] * (layers + 1)))
        least = schedule_cost(counts_for([float(num_tokens)] * layers))  # every block at its cap or the floor
        if least > budget:
            raise ValueError(f"cost={cost} is below what this schedule can spend: at least "
                             f"{least / schedule_cost([num_tokens] * (layers + 1)):.3f} of the unmerged cost, every "
                             f"block merging {'half its tokens' if bipartite else 'down to the floor'}")
    lo, hi = 0.0, float(num_tokens) / min(weights)  # at hi even the widest-reading block asks for every token
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if schedule_cost(counts_for([mid * w for w in weights])) <= budget:
            hi = mid  # merging more lowers the cost: the scale is past the budget
        else:
            lo = mid
    counts = counts_for([hi * w for w in weights])  # within budget: hi starts at the least cost, every block capped
    return [counts[i] - counts[i + 1] for i in range(layers)]
