"""ToMe-style bipartite soft matching (Bolya et al., ICLR 2023), reimplemented.

Tokens alternate into sets A and B; each A token finds its most cosine-similar
B token; the r most similar A tokens are merged into their partners by
size-weighted averaging. One round removes at most ceil(T/2) tokens (fewer with
``max_round_share``), so :func:`tome_merge` runs rounds until K tokens remain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..primitives import weighted_mean

# On a CPU a round splits its batch into chunks of images whose temporaries (normalised states, the [b, T/2, T/2]
# scores, the scaled rule's cost factors) stay in cache, at most _ELEMENTS_PER_CHUNK of them, where that pays: with
# the scaled rule (more passes over the scores) or states of _STATES_TO_SPLIT elements or more (tens of MB, each pass
# to memory); small plain rounds lose to the chunks' per-call overhead
# (benchmarks/exploration/bipartite_chunk_check.py). Under torch.compile the batch goes whole: the compiled graph
# runs as fast without chunks, and unrolled chunks cost compile time (BENCHMARKS.md, stop 73).
# Each image's round is its own, so the chunks give the same assignment as the whole batch.
_ELEMENTS_PER_CHUNK = 1 << 21
_STATES_TO_SPLIT = 1 << 22


def images_per_chunk(b: int, t: int, c: int, scaled: bool, device: torch.device | str = "cpu") -> int:
    """Images of ``[b, t, c]`` states one round takes at a time (``b``: the whole batch at once)."""
    if torch.device(device).type != "cpu" or not (scaled or b * t * c >= _STATES_TO_SPLIT) \
            or torch.compiler.is_compiling():
        return b
    ta, tb = (t + 1) // 2, t // 2
    return max(1, min(b, _ELEMENTS_PER_CHUNK // max(1, t * c + 2 * ta * tb)))


def bipartite_round(
    metric: Tensor, r: int, *, protect_first: bool = False, penalty: Tensor | None = None,
    cost_scale: Tensor | None = None, padding: Tensor | None = None,
) -> Tensor:
    """One matching round: new index ``[B, T]`` in ``[0, T - r)`` of each of T tokens.

    Args:
        metric: ``[B, T, C]`` features compared by cosine similarity (ToMe uses keys).
        r: tokens to remove, ``0 <= r <= ceil(T / 2)``.
        protect_first: never merge token 0 (a class token).
        penalty: ``[B, T]`` subtracted from each token's best match score before the r
            merges are chosen (QuickMerge++'s additive rule passes saliency, so salient tokens stay).
        cost_scale: ``[B, T]`` non-negative factors; when given, an edge's score is minus its cost
            ``(1 - cos_ab) * (1 + cost_scale_a + cost_scale_b)``: each A token's partner is its
            cheapest B token, the r cheapest edges merge (QuickMerge++'s scaled rule).
        padding: ``[B, T]`` bool, tokens that stand for no patch (a batch padded to one length): an
            A token of padding is merged before any other (that costs nothing) and a real A token
            never takes one as its match (its merges must not depend on what padding holds).
    """
    b, t, c = metric.shape
    if r <= 0:
        return torch.arange(t, device=metric.device).expand(b, t)
    ta = (t + 1) // 2
    if r > ta:
        raise ValueError(f"r must be at most ceil(T/2)={ta}, got {r}")
    step = images_per_chunk(b, t, c, cost_scale is not None, metric.device)
    if step < b:
        def part(v: Tensor | None, i: int) -> Tensor | None:
            return None if v is None else v[i : i + step]

        return torch.cat([_bipartite_round(metric[i : i + step], r, protect_first, part(penalty, i),
                                           part(cost_scale, i), part(padding, i)) for i in range(0, b, step)])
    return _bipartite_round(metric, r, protect_first, penalty, cost_scale, padding)


def _bipartite_round(metric: Tensor, r: int, protect_first: bool, penalty: Tensor | None,
                     cost_scale: Tensor | None, padding: Tensor | None) -> Tensor:
    """:func:`bipartite_round` on one chunk of images (arguments checked there)."""
    b, t, _ = metric.shape
    mn = F.normalize(metric.detach(), dim=-1)
    a, bset = mn[:, ::2], mn[:, 1::2]
    ta, tb = a.shape[1], bset.shape[1]
    scores = torch.matmul(a, bset.transpose(1, 2))
    if padding is not None:
        scores.masked_fill_(~padding[:, ::2, None] & padding[:, None, 1::2], float("-inf"))
    if cost_scale is not None:
        c = cost_scale.detach().to(scores.dtype)
        scores.sub_(1.0).mul_((1.0 + c[:, ::2, None]) + c[:, None, 1::2])  # minus the edge cost, in place
    if protect_first:
        scores[:, 0] = float("-inf")
    best, dst = scores.max(dim=-1)
    if penalty is not None:
        best = best - penalty[:, ::2].to(best.dtype)
    if padding is not None:
        best = best.masked_fill(padding[:, ::2], float("inf"))
    order = best.sort(dim=-1, descending=True, stable=True).indices  # tied edges: the lower A token first
    src, keep = order[:, :r], order[:, r:].sort(dim=-1).values
    kept = ta - r
    new_a = torch.empty(b, ta, dtype=torch.long, device=metric.device)
    new_a.scatter_(1, keep, torch.arange(kept, device=metric.device).expand(b, kept))
    new_a.scatter_(1, src, kept + dst.gather(1, src))
    new_index = torch.empty(b, t, dtype=torch.long, device=metric.device)
    new_index[:, ::2] = new_a
    new_index[:, 1::2] = kept + torch.arange(tb, device=metric.device)
    return new_index


def tome_merge(
    x: Tensor,
    k: int,
    metric: Tensor | None = None,
    *,
    protect_first: bool = False,
    max_round_share: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge ``x [B, N, D]`` down to ``k`` tokens by repeated bipartite rounds.

    Args:
        protect_first: token 0 is never merged away (a class token, an attention sink).
        max_round_share: at most this share of the current tokens is merged in one round.
            0.5 is ToMe's (every A token may go: one round halves the tokens, merging each
            even token whatever its best match); smaller shares keep only the best edges
            of each round.
    Returns:
        ``merged [B, K, D]`` (size-weighted means), ``assignment [B, N]`` (group of
        each input token) and ``sizes [B, K]``.
    """
    b, n, _ = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must satisfy 1 <= k <= N={n}, got {k}")
    metric = x if metric is None else metric
    assignment = torch.arange(n, device=x.device).expand(b, n)
    sizes = torch.ones(b, n, device=x.device)
    means, feats, t = x, metric, n
    if not 0.0 < max_round_share <= 0.5:
        raise ValueError(f"max_round_share must lie in (0, 0.5], got {max_round_share}")
    while t > k:
        cap = (t + 1) // 2 - (1 if protect_first else 0)  # the A tokens that may be merged away
        if cap == 0:  # t == 2 with token 0 protected and k == 1: token 1 joins token 0
            new_index, t = torch.zeros(b, t, dtype=torch.long, device=x.device), 1
        else:
            r = min(t - k, cap, max(1, int(max_round_share * t)))
            new_index = bipartite_round(feats, r, protect_first=protect_first)
            t -= r
        # ToMe's merge: each group's value is the size-weighted mean of what it absorbs
        means, _ = weighted_mean(means, sizes, new_index, t)
        feats, sizes = weighted_mean(feats, sizes, new_index, t)
        assignment = new_index.gather(1, assignment)
    return means, assignment, sizes.round().long()
