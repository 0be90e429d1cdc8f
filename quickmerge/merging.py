"""Steps 3-5: merge masses, clustering into exactly K groups, weighted means.

All functions are batched over B, run on the input's device and keep its dtype
(accumulation in float32 for half-precision inputs). Group k of each sequence
is seeded by the k-th selected token in sequence order, so merged tokens come
out roughly in input order; in causal mode groups are contiguous spans in
order.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import ValueChecks, check_num_tokens, check_positive_int, check_real, check_scores, check_tokens
from .primitives import gather_rows, group_sum, weighted_mean
from .selection import select_tokens

# Elements of the [B, rows, K] similarity block materialised at once.
_CHUNK_ELEMENTS = 1 << 24


def merge_mass(mask: Tensor, saliency: Tensor, epsilon: float) -> Tensor:
    """Merge mass ``m_i = mask_i * max(s_i, eps) + (1 - mask_i) * eps``, ``[B, N]``.

    Clamping s at eps keeps a selected token from weighing less than a
    background one, so every group has positive mass.
    """
    return mask * saliency.float().clamp_min(epsilon) + (1.0 - mask) * epsilon


def assign_to_seeds(keys: Tensor, is_seed: Tensor, seeds: Tensor) -> Tensor:
    """Group ``[R, L]`` of each entry: seeds their own, the others their most cosine-similar seed.

    Args:
        keys: ``[R, L, d]``; is_seed: ``[R, L]`` bool; seeds: ``[R, K]`` seed indices in order.
    Only the L - K non-seed rows are compared with the K seeds (half the work of a full assignment).
    """
    rows, length, d = keys.shape
    kept = seeds.shape[1]
    unit = F.normalize(keys.float(), dim=-1)
    others = (~is_seed).nonzero()[:, 1].view(rows, length - kept)
    centres = unit.gather(1, seeds[..., None].expand(-1, -1, d))
    nearest = torch.matmul(unit.gather(1, others[..., None].expand(-1, -1, d)), centres.transpose(1, 2)).argmax(-1)
    assignment = torch.empty(rows, length, dtype=torch.long, device=keys.device)
    assignment.scatter_(1, seeds, torch.arange(kept, device=keys.device).expand(rows, kept))
    return assignment.scatter_(1, others, nearest)


def _nearest_centre(xn: Tensor, centres: Tensor) -> Tensor:
    """Index ``[B, N]`` of the most cosine-similar centre; rows processed in chunks."""
    b, n, _ = xn.shape
    rows = max(1, _CHUNK_ELEMENTS // max(1, b * centres.shape[1]))
    ct = centres.transpose(1, 2)
    return torch.cat([torch.matmul(xn[:, i : i + rows], ct).argmax(dim=-1) for i in range(0, n, rows)], dim=1)


def cluster_by_similarity(x: Tensor, mass: Tensor, seeds: Tensor, iters: int = 2) -> Tensor:
    """Assign N tokens to K groups by cosine similarity (seeded, mass-weighted k-means).

    Args:
        x: ``[B, N, D]`` tokens.
        mass: ``[B, N]`` positive weights of the centre updates.
        seeds: ``[B, K]`` indices of the seed tokens; seed k always stays in group k,
            so every group is non-empty and there are exactly K groups.
        iters: centre updates after the initial assignment.
    Returns:
        ``[B, N]`` group index (long) of each token.
    """
    b = x.shape[0]
    k = seeds.shape[1]
    with torch.no_grad():
        xn = F.normalize(x.detach(), dim=-1)
        own = torch.arange(k, device=x.device).expand(b, k)
        centres = gather_rows(xn, seeds)
        assignment = _nearest_centre(xn, centres).scatter_(1, seeds, own)
        weighted = mass.detach()[..., None].to(xn.dtype) * xn
        for _ in range(iters):
            centres = F.normalize(group_sum(weighted, assignment, k), dim=-1)
            assignment = _nearest_centre(xn, centres).scatter_(1, seeds, own)
    return assignment


def contiguous_spans(
    x: Tensor, saliency: Tensor, k: int, saliency_weight: float = 1.0, cut_first: Tensor | None = None,
    tie_rank: Tensor | None = None,
) -> Tensor:
    """Order-preserving grouping into K contiguous spans, cut at the K - 1 weakest links.

    Link i joins tokens i and i + 1 with strength
    ``cos(x_i, x_{i+1}) - saliency_weight * max(s_i, s_{i+1})``: spans break
    where neighbours differ, and on both sides of salient tokens, which thus
    stay alone. With ``saliency_weight=0`` this is single-linkage clustering on
    the chain of tokens.

    Args:
        x: ``[B, N, D]`` tokens; saliency: ``[B, N]`` in [0, 1]; k: number of spans.
        cut_first: ``[N - 1]`` or ``[B, N - 1]`` bool, links cut before any other (boundaries between
            frames' locations in time-major order; tokens that may not merge), as far as k allows.
        tie_rank: ``[N - 1]`` distinct integers: among exactly tied links, lower ranks are cut first
            (default: the link's position, lowest first). Either way the same on every device.
    Returns:
        ``[B, N]`` group index, non-decreasing along N, taking every value 0..K-1.
    """
    b, n, _ = x.shape
    if k == 1 or n == 1:
        return torch.zeros(b, n, dtype=torch.long, device=x.device)
    with torch.no_grad():
        xn = F.normalize(x.detach(), dim=-1)
        link = (xn[:, :-1] * xn[:, 1:]).sum(dim=-1).float()
        s = saliency.detach().float()
        link = link - saliency_weight * torch.maximum(s[:, :-1], s[:, 1:])
        if cut_first is not None:
            link = link - (2.0 + saliency_weight) * cut_first.to(link.device, link.dtype)  # below any other link
        # Exactly tied links (identical neighbours: a static pixel through time) are cut in a fixed order. topk
        # breaks ties in an order of its own that differs between CPU and CUDA kernels; a stable sort does not.
        if tie_rank is None:
            cuts = link.sort(dim=-1, stable=True).indices[:, : k - 1]
        else:
            by_rank = tie_rank.to(link.device).argsort()
            cuts = by_rank[link[:, by_rank].sort(dim=-1, stable=True).indices[:, : k - 1]]
        starts = torch.zeros(b, n, dtype=torch.long, device=x.device).scatter_(1, cuts + 1, 1)
    return starts.cumsum(dim=1)


def time_major_order(length: int, period: int, offset: int = 0, device: torch.device | None = None) -> Tensor:
    """Permutation ``[L]`` that lists a video's tokens location by location, each through time.

    Token ``i >= offset`` sits at location ``(i - offset) % period`` of frame ``(i - offset) // period``;
    the order is location 0 in frames 0, 1, ..., then location 1, ...; the first ``offset``
    tokens (a BOS, a prompt) come first, in order. Contiguous spans in this order are runs of
    one location across consecutive frames: :func:`contiguous_spans` on ``x[:, order]`` merges
    along time.
    """
    return torch.argsort(frame_location(length, period, offset, device) * length + torch.arange(length, device=device))


def frame_location(length: int, period: int, offset: int = 0, device: torch.device | None = None) -> Tensor:
    """Location ``[L]`` of each token within its frame (-1 before ``offset``); see :func:`time_major_order`."""
    check_positive_int(period, "period")
    check_positive_int(offset, "offset", minimum=0)
    index = torch.arange(length, device=device)
    return torch.where(index < offset, -1, (index - offset) % period)


def spans_along_time(x: Tensor, saliency: Tensor, k: int, period: int, offset: int = 0,
                     saliency_weight: float = 1.0) -> Tensor:
    """Group ``[B, N]`` of each token of a video sequence: contiguous spans in time-major order.

    Spans break first between locations, so with ``k`` above the number of locations each
    group holds one location across consecutive frames; below it, neighbouring locations
    (in raster order) join too.
    """
    n = x.shape[1]
    order = time_major_order(n, period, offset, x.device)
    location = frame_location(n, period, offset, x.device)[order]
    boundaries = location[1:] != location[:-1]
    spans = contiguous_spans(x[:, order], saliency[:, order], k, saliency_weight, cut_first=boundaries)
    return torch.empty_like(spans).scatter_(1, order.expand_as(spans), spans)


def most_salient_member(saliency: Tensor, assignment: Tensor, k: int) -> Tensor:
    """Index ``[B, K]`` of the most salient token of each group (lowest index on ties)."""
    b, n = saliency.shape
    s = saliency.detach().float()
    best = torch.full((b, k), float("-inf"), device=s.device).scatter_reduce(1, assignment, s, "amax")
    pos = torch.arange(n, device=s.device).expand(b, n)
    is_best = s == best.gather(1, assignment)
    return torch.full((b, k), n, dtype=torch.long, device=s.device).scatter_reduce(
        1, assignment, torch.where(is_best, pos, torch.full_like(pos, n)), "amin"
    )


class MergeResult(tuple):
    """``(merged, mask)`` as the spec returns it, carrying the merge's structure.

    Unpacks as ``merged, mask = result``. Attributes:
        merged: ``[B, K, D]`` merged tokens.
        mask: ``[B, N]`` selection mask (relaxed in training, hard in eval).
        assignment: ``[B, N]`` long, group of each input token.
        sizes: ``[B, K]`` long, tokens per group.
        mass: ``[B, K]`` total merge mass per group.
        positions: ``[B, K]`` float, mass-weighted mean position of each group.
        first, last: ``[B, K]`` long, lowest and highest token index in each group.
        seeds: ``[B, K]`` long, each group's seed: the selected token that
            seeded it, or in causal mode the most salient token of the span.
    """

    merged: Tensor
    mask: Tensor
    assignment: Tensor
    sizes: Tensor
    mass: Tensor
    positions: Tensor
    first: Tensor
    last: Tensor
    seeds: Tensor

    def __new__(cls, merged: Tensor, mask: Tensor, **structure: Any) -> MergeResult:
        self = super().__new__(cls, (merged, mask))
        self.merged, self.mask = merged, mask
        for name, value in structure.items():
            setattr(self, name, value)
        return self

    @property
    def num_tokens(self) -> int:
        """K, the number of merged tokens."""
        return self.merged.shape[1]

    @property
    def ratio(self) -> float:
        """Achieved keep ratio K / N."""
        return self.merged.shape[1] / self.assignment.shape[1]

    def unmerge(self, tokens: Tensor | None = None) -> Tensor:
        """Broadcast ``[B, K, C]`` group values (default: merged tokens) back to ``[B, N, C]``."""
        tokens = self.merged if tokens is None else tokens
        return gather_rows(tokens, self.assignment)


def merge_groups(x: Tensor, mass: Tensor, assignment: Tensor, k: int, mask: Tensor, seeds: Tensor) -> MergeResult:
    """Mass-weighted mean of each group: ``x~_k = sum_{j in G_k} m_j x_j / sum_{j in G_k} m_j``.

    Args:
        x: ``[B, N, D]``; mass: ``[B, N]`` positive; assignment: ``[B, N]`` in [0, K).
    """
    b, n, _ = x.shape
    merged, group_mass = weighted_mean(x, mass, assignment, k)
    m = mass.to(group_mass.dtype)
    pos = torch.arange(n, device=x.device).expand(b, n)
    with torch.no_grad():
        sizes = torch.zeros(b, k, dtype=torch.long, device=x.device).scatter_add_(1, assignment, torch.ones_like(pos))
        positions = torch.zeros(b, k, dtype=m.dtype, device=x.device).scatter_add_(1, assignment, m * pos) / group_mass
        first = torch.full((b, k), n, dtype=torch.long, device=x.device).scatter_reduce(1, assignment, pos, "amin")
        last = torch.zeros(b, k, dtype=torch.long, device=x.device).scatter_reduce(1, assignment, pos, "amax")
    return MergeResult(
        merged,
        mask,
        assignment=assignment,
        sizes=sizes,
        mass=group_mass,
        positions=positions,
        first=first,
        last=last,
        seeds=seeds,
    )


def identity_result(x: Tensor) -> MergeResult:
    """The K == N result: every token its own group, ``merged`` is ``x`` itself."""
    b, n, _ = x.shape
    pos = torch.arange(n, device=x.device).expand(b, n)
    ones = torch.ones(b, n, device=x.device)
    return MergeResult(
        x,
        ones,
        assignment=pos,
        sizes=torch.ones(b, n, dtype=torch.long, device=x.device),
        mass=ones,
        positions=pos.float(),
        first=pos,
        last=pos,
        seeds=pos,
    )


class DifferentiableTokenMerging(torch.nn.Module):
    """Steps 2-5: Gumbel-softmax K-hot selection, mass assignment, clustering, merging.

    Args:
        temperature: tau of the relaxed K-hot mask, in (0, 100].
        epsilon: merge mass of unselected tokens, in (0, 1].
        causal: order-preserving mode; groups are contiguous ordered spans, so the
            output is a valid left-to-right prefix for a causal model.
        saliency_weight: in causal mode, how strongly span boundaries are drawn
            around salient tokens (see :func:`contiguous_spans`).
        kmeans_iters: centre updates of the cosine k-means (non-causal mode).
        generator: RNG for the Gumbel noise in training (default: global RNG).

    ``forward(X, saliency_scores, K)`` returns a :class:`MergeResult`, which
    unpacks as ``(merged [B, K, D], mask [B, N])``. In training the mask is the
    relaxed K-hot mask and gradients reach X and the saliency; in eval mode the
    mask is the hard top-K of saliency and the result is deterministic.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.1,
        *,
        causal: bool = False,
        kmeans_iters: int = 2,
        saliency_weight: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.temperature = check_real(temperature, "temperature", low=0.0, high=100.0, low_open=True, high_open=False)
        self.epsilon = check_real(epsilon, "epsilon", low=0.0, high=1.0, low_open=True, high_open=False)
        self.kmeans_iters = check_positive_int(kmeans_iters, "kmeans_iters", minimum=0)
        self.causal = bool(causal)
        self.saliency_weight = check_real(
            saliency_weight, "saliency_weight", low=0.0, high=float("inf"), low_open=False, high_open=True
        )
        self.generator = generator

    def forward(self, X: Tensor, saliency_scores: Tensor, K: int) -> MergeResult:
        checks = ValueChecks()
        check_tokens(X, "X", checks=checks)
        b, n, _ = X.shape
        k = check_num_tokens(K, n)
        check_scores(saliency_scores, "saliency_scores", b, n, nonnegative=True, checks=checks)
        checks.resolve()
        return self.merge(X, saliency_scores, k)

    def merge(self, X: Tensor, saliency_scores: Tensor, k: int) -> MergeResult:
        """:meth:`forward` without argument checks (for callers that checked them)."""
        n = X.shape[1]
        if k == n:
            return identity_result(X)
        mask, seeds = select_tokens(
            saliency_scores,
            k,
            temperature=self.temperature,
            floor=self.epsilon,
            training=self.training,
            generator=self.generator,
        )
        mass = merge_mass(mask, saliency_scores, self.epsilon)
        if self.causal:
            assignment = contiguous_spans(X, saliency_scores, k, self.saliency_weight)
            seeds = most_salient_member(saliency_scores, assignment, k)
        else:
            assignment = cluster_by_similarity(X, mass, seeds, self.kmeans_iters)
        return merge_groups(X, mass, assignment, k, mask, seeds)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, epsilon={self.epsilon}, causal={self.causal}, "
            f"kmeans_iters={self.kmeans_iters}, saliency_weight={self.saliency_weight}"
        )
