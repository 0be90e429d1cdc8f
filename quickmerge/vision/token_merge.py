"""Token reduction inside a vision transformer block: saliency, which tokens go where, the merge.

Every method maps the n mergeable tokens of a layer (class and register tokens excluded)
to ``n - r`` groups and returns ``dst [B, n]``, the group of each token, or ``-1`` for a
token that is dropped. Groups are numbered in the order the kept tokens take (bipartite
matching: set A's kept tokens, then set B); :func:`in_first_member_order` renumbers them in
the order of each group's first member, which keeps the tokens in patch order.

- ``quickmerge``: entropy-aware saliency from the attention the class token gives each
  token (heads weighted by focus); a token's removal score is its redundancy (cosine
  similarity of its key to its best match) minus ``saliency_weight`` times its saliency
  rank; the r highest-scoring tokens join their most similar kept token (K-hot selection +
  clustering to the kept count); merged values are weighted by size times merge mass.
  Matches are searched ToMe's way (alternating sets, ``bipartite``, the default) or over
  all tokens (``greedy``: of two mutually nearest tokens the second goes only after every
  other candidate, when r leaves no choice, the held ones by their own scores). Options: the
  ``scaled`` saliency rule (a pair costs its dissimilarity times the attention both ends
  receive) and ``similarity="hidden"`` (tokens compared by the residual stream, not keys).
- ``tome``: ToMe's bipartite soft matching (alternate tokens, r best edges).
- ``random``: drop r tokens chosen uniformly at random.
- ``pool``: average n tokens in n - r contiguous runs of the current order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import check_positive_int
from ..baselines.tome import bipartite_round
from ..primitives import normalize_entropy, rank01, top_indices

METHODS = ("quickmerge", "tome", "random", "pool")
SALIENCY_SOURCES = ("cls", "queries", "mean")
SALIENCY_RULES = ("additive", "scaled")
SIMILARITIES = ("keys", "hidden")
# Token pairs ([b, n, n] scores) greedy matching holds at once on a CPU: images are matched in chunks whose scores
# stay in cache, since every pass over them is memory-bound (the assignment 1.4-2.4x faster at batch 256 and 196
# tokens on 2 cores; identical groups; BENCHMARKS.md, stop 49). Other devices match the batch at once: there a
# chunk buys no cache hits and costs a launch per operation.
_PAIRS_PER_CHUNK = 1 << 20
# Attention entries ([b, H, M, N] logits) the saliency holds at once on a CPU, for the same reason: with 16 queries
# per image a batch of 256 makes tens of MB per pass, in chunks of ~2 MB the passes run ~2.5x faster (stop 68).
_LOGITS_PER_CHUNK = 1 << 19


@torch.no_grad()  # sets ranks and costs, never differentiated: computed in place; entropy's gradient is NaN at p = 0
def attention_saliency(
    q: Tensor, k: Tensor, scale: float, log_size: Tensor | None, source: str = "cls", num_queries: int = 16,
    valid: Tensor | None = None,
) -> Tensor:
    """Entropy-weighted attention received by each key, ``[B, N]`` summing to 1 per image.

    Args:
        q, k: ``[B, H, N, hd]`` queries and keys of the layer (after any qk-norm).
        scale: the attention's logit scale. log_size: ``[B, N]`` proportional-attention bias or None.
        source: ``"cls"`` uses the class token's query only; ``"queries"`` uses ``num_queries``
            queries spread evenly over the sequence (recomputed, so fused attention stays usable), over
            the real tokens only where ``valid [B, N]`` (bool, False = padding) is given; ``log_size`` must
            then mask the padding keys (-inf there); ``"mean"`` uses one query, the mean of all queries over the
            patches (each token weighted by its size, ``exp(log_size)``, when given; padding excluded).
    Each (head, query) distribution is weighted by ``1 - H/log N`` (H its entropy), so focused
    heads and queries count more than diffuse ones. The result carries no gradient (it sets ranks and costs).
    """
    if source not in SALIENCY_SOURCES:
        raise ValueError(f"saliency must be one of {SALIENCY_SOURCES}, got {source!r}")
    check_positive_int(num_queries, "num_queries")
    b, h, n, _ = k.shape
    m = min(num_queries, n) if source == "queries" else 1
    step = max(1, _LOGITS_PER_CHUNK // (h * m * n)) if k.device.type == "cpu" else b
    if step < b:  # each image's saliency is its own: chunks give the same values
        return torch.cat([attention_saliency(
            q[i : i + step], k[i : i + step], scale, None if log_size is None else log_size[i : i + step], source,
            num_queries, None if valid is None else valid[i : i + step]) for i in range(0, b, step)])
    if source == "cls":
        qs = q[:, :, :1]
    elif source == "mean":
        size = log_size.float().exp() if log_size is not None else valid.float() if valid is not None else None
        if size is None:
            qs = q.float().mean(dim=2, keepdim=True)
        else:  # [B, H, 1, hd] the mean over the patches
            qs = torch.einsum("bhnd,bn->bhd", q.float(), size / size.sum(dim=1, keepdim=True))[:, :, None]
    elif valid is not None:
        real = valid.sum(dim=1, keepdim=True)  # [B, 1]
        order = (~valid).to(torch.uint8).argsort(dim=1, stable=True)  # real tokens first, in order
        spread = torch.arange(m, device=q.device) * (real - 1).clamp_min(0) // max(m - 1, 1)  # [B, m]
        index = order.gather(1, spread)  # [B, m] evenly spread over each image's real tokens
        qs = q.gather(2, index[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))
    else:
        qs = q[:, :, torch.linspace(0, n - 1, m, device=q.device).long()]
    # Each pass over the [B, H, M, N] logits counts when M is many: the scale goes on the queries, the bias is added
    # in place, one exponential per logit gives p, the entropy is log Z - sum(p * shifted logits) (a dot product
    # per row, no log per entry) and the attention received is a matrix product of the weights with p.
    logits = torch.matmul(qs.float() * scale, k.float().transpose(-1, -2))  # [B, H, M, N]
    if log_size is not None:
        logits += log_size[:, None, None, :].float()
        if valid is not None:  # padding keys: -inf clamped to a finite logit whose p is 0, so p * logit is 0
            logits.clamp_min_(torch.finfo(logits.dtype).min)
    logits -= logits.amax(dim=-1, keepdim=True)  # each row's largest logit 0
    p = logits.exp()
    total = p.sum(dim=-1, keepdim=True)
    p /= total
    entropy = total[..., 0].log() - torch.linalg.vecdot(p, logits)  # [B, H, M] nats
    support = n if valid is None else valid.sum(dim=1)[:, None, None]  # keys a query may attend to
    weight = (1.0 - normalize_entropy(entropy, support)).clamp_min(1e-6)  # focus: 1 - normalised entropy
    received = torch.matmul(weight.flatten(1, 2)[:, None, :], p.flatten(1, 2))[:, 0]  # [B, N]
    return received / weight.sum(dim=(1, 2))[:, None]


def quickmerge_bipartite_assign(metric: Tensor, saliency: Tensor, r: int, saliency_weight: float,
                                keep_score: Tensor | None = None, rule: str = "additive",
                                padding: Tensor | None = None) -> Tensor:
    """Bipartite variant: ToMe's alternating sets, saliency entering each edge by ``rule``.

    ``"additive"``: the edge's cosine similarity lowered by ``saliency_weight`` times the source's saliency rank (and
    by a learned ``keep_score [B, n]``, :class:`~quickmerge.vision.token_scorer.TokenScorer`'s, if given).
    ``"scaled"``: the edge's dissimilarity scaled by both ends' attention,
    ``(1 - cos_ab) * (1 + w n (s_a + s_b))`` (``s`` sums to about 1 over the ``n`` tokens, so ``n s`` is 1 for a
    token of average saliency): a merge costs what it changes in what the class token reads, so a salient pair
    of near-duplicates may still merge. Measured closer to the unmerged model's outputs at large r (BENCHMARKS.md).
    ``padding [B, n]`` (bool): tokens that stand for no patch, as in
    :func:`~quickmerge.baselines.tome.bipartite_round`.
    """
    if rule == "scaled":
        cost_scale = scaled_cost(saliency, saliency_weight, keep_score)
        return bipartite_round(metric, r, cost_scale=cost_scale, padding=padding)
    return bipartite_round(metric, r, penalty=removal_penalty(saliency, saliency_weight, keep_score), padding=padding)


def scaled_cost(saliency: Tensor, saliency_weight: float, keep_score: Tensor | None = None) -> Tensor:
    """``[B, n]`` factors ``w n s`` of the scaled rule: a pair's cost is ``(1 - cos) * (1 + c_a + c_b)``."""
    if keep_score is not None:
        raise ValueError("a learned saliency (scorer) is trained with the additive rule; saliency_rule='scaled' "
                         "takes none")
    return saliency_weight * saliency.shape[1] * saliency.float()


def removal_penalty(saliency: Tensor, saliency_weight: float, keep_score: Tensor | None = None) -> Tensor:
    """``[B, n]`` protection of each token from being merged away: weighted saliency rank plus learned score."""
    penalty = saliency_weight * rank01(saliency)
    return penalty if keep_score is None else penalty + keep_score


def quickmerge_assign(
    metric: Tensor, saliency: Tensor, r: int, saliency_weight: float, *, return_removed: bool = False,
    keep_score: Tensor | None = None, rule: str = "additive", padding: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """QuickMerge++ grouping: ``dst [B, n]`` into ``n - r`` groups (kept tokens in order).

    With ``return_removed``, also the indices ``[B, r]`` of the tokens merged into others;
    ``keep_score [B, n]`` (learned) lowers a token's removal score further. ``rule`` as in
    :func:`quickmerge_bipartite_assign`: ``"scaled"`` ranks every pair by minus its cost
    ``(1 - cos_ij) * (1 + w n (s_i + s_j))`` instead of its cosine, with no separate penalty.
    ``padding [B, n]`` (bool): tokens that stand for no patch: removed before any other, never a real token's
    match or target.
    """
    b, n, _ = metric.shape
    if not 0 <= r <= n - 1:
        raise ValueError(f"r must lie in [0, {n - 1}] (every token but one may be merged away), got {r}")
    step = max(1, _PAIRS_PER_CHUNK // (n * n)) if metric.device.type == "cpu" else max(1, b)
    parts = [_greedy_groups(metric[i : i + step], saliency[i : i + step], r, saliency_weight,
                            None if keep_score is None else keep_score[i : i + step], rule,
                            None if padding is None else padding[i : i + step]) for i in range(0, b, step)]
    dst = torch.cat([part[0] for part in parts])
    return (dst, torch.cat([part[1] for part in parts])) if return_removed else dst


def _greedy_groups(metric: Tensor, saliency: Tensor, r: int, saliency_weight: float, keep_score: Tensor | None,
                   rule: str, padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`quickmerge_assign` on one chunk of images: ``(dst [b, n], removed [b, r])``."""
    b, n, _ = metric.shape
    mn = F.normalize(metric.detach().float(), dim=-1)  # sets indices only: no gradient to carry
    sim = torch.matmul(mn, mn.transpose(1, 2))  # [B, n, n]; below, higher = better to merge
    if rule == "scaled":
        c = scaled_cost(saliency, saliency_weight, keep_score)
        sim.sub_(1.0).mul_((c[:, :, None] + c[:, None, :]).add_(1.0))  # minus the cost of each pair, in place
        penalty = torch.zeros_like(c)
    else:
        penalty = removal_penalty(saliency, saliency_weight, keep_score).float()
    if padding is not None:  # a real token's redundancy and target are real tokens
        sim.masked_fill_(~padding[:, :, None] & padding[:, None, :], float("-inf"))
    sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))
    redundancy, nearest = sim.max(dim=-1)
    removal = redundancy - penalty
    # of two tokens that are each other's nearest, only the one more worth removing may go, unless r exceeds the
    # tokens that rule allows: then the held ones go too, in the order of their own scores
    partner = removal.gather(1, nearest)
    index = torch.arange(n, device=metric.device)
    mutual = nearest.gather(1, nearest) == index
    held = mutual & ((partner > removal) | ((partner == removal) & (nearest > index)))  # ties: the later one goes
    if padding is not None:  # after the mutual rule: two padding tokens may both go, whatever they join
        removal = removal.masked_fill(padding, float("inf"))
        held = held & ~padding
    by_score = removal.sort(dim=-1, descending=True, stable=True).indices  # tied scores: the lower index first
    removed = by_score.gather(1, held.gather(1, by_score).to(torch.uint8).sort(dim=-1, stable=True).indices[:, :r])
    is_removed = torch.zeros(b, n, dtype=torch.bool, device=metric.device).scatter_(1, removed, True)
    group_of_kept = (~is_removed).long().cumsum(dim=1) - 1  # rank among kept tokens
    # each removed token joins its most similar kept token
    to_kept = sim.gather(1, removed[..., None].expand(b, r, n)).masked_fill_(is_removed[:, None, :], float("-inf"))
    target = to_kept.argmax(dim=-1)  # [B, r] index of a kept token
    return group_of_kept.scatter(1, removed, group_of_kept.gather(1, target)), removed


def tome_assign(metric: Tensor, r: int, padding: Tensor | None = None) -> Tensor:
    """ToMe's bipartite soft matching; ``r`` is capped at half the tokens by the caller; ``padding [B, n]``
    (bool) as in :func:`~quickmerge.baselines.tome.bipartite_round`."""
    return bipartite_round(metric, r, padding=padding)


def in_first_member_order(dst: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Renumber the ``k`` groups of ``dst [B, n]`` (group of each token, -1: dropped) by their first member's
    position: ``(dst, order)``, ``order [B, k]`` the old number of the group now at each place (gather the merged
    tokens with it). Every group has a member and no two share one, so the order has no ties."""
    b, n = dst.shape
    position = torch.arange(n, device=dst.device).expand(b, n)
    first = torch.full((b, k + 1), n, dtype=torch.long, device=dst.device)  # a spare group for dropped tokens
    first.scatter_reduce_(1, torch.where(dst >= 0, dst, k), position, "amin")
    order = first[:, :k].argsort(dim=-1)
    number = torch.empty_like(order).scatter_(1, order, position[:, :k])
    return torch.where(dst >= 0, number.gather(1, dst.clamp_min(0)), -1), order


def random_assign(b: int, n: int, r: int, device: torch.device, generator: torch.Generator | None,
                  padding: Tensor | None = None) -> Tensor:
    """Drop r random tokens: ``dst`` is the rank among kept tokens, -1 for dropped ones; ``padding [B, n]``
    (bool) is dropped before any real token."""
    noise = torch.rand(b, n, generator=generator, device="cpu" if generator is None else generator.device).to(device)
    if padding is not None:
        noise = noise.masked_fill(padding, 2.0)  # above every uniform draw
    dropped = noise.topk(r, dim=-1).indices
    keep = torch.ones(b, n, dtype=torch.bool, device=device).scatter_(1, dropped, False)
    return torch.where(keep, keep.long().cumsum(dim=1) - 1, torch.full_like(dropped[:, :1], -1).expand(b, n))


def pool_assign(b: int, n: int, r: int, device: torch.device) -> Tensor:
    """n tokens into n - r contiguous runs of (nearly) equal length."""
    return (torch.arange(n, device=device) * (n - r) // n).expand(b, n)


def relaxed_bipartite_merge(
    x: Tensor, weight: Tensor, metric: Tensor, penalty: Tensor | None, r: int, temperature: float,
    generator: torch.Generator | None = None, cost_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """QuickMerge++'s bipartite merge for training: hard in the forward pass, relaxed in the backward.

    Of the alternate (A) tokens, the r whose best match in the other set (B), less ``penalty``,
    plus Gumbel noise of scale ``temperature`` scores highest merge into that match (the hard
    forward pass, numerically the :func:`quickmerge_bipartite_assign` merge for that noise).
    Each A token enters its match's weighted mean with weight ``rho * w`` where ``rho`` is the
    straight-through relaxed K-hot removal mask (:func:`~quickmerge.selection.relaxed_topk_mask`,
    sums to r): 1 or 0 in value, its gradient the relaxed mask's, so the similarity of keys
    that decides the merges is trained through.

    Args:
        x: ``[B, m, C]`` tokens; weight: ``[B, m]`` positive (sizes x merge masses);
        metric: ``[B, m, c]`` keys; penalty: ``[B, m]`` subtracted from match scores, or None.
        cost_scale: ``[B, m]`` factors of the scaled rule (:func:`scaled_cost`); an edge's score is then minus
            its cost ``(1 - cos_ab) * (1 + c_a + c_b)``, as in :func:`~quickmerge.baselines.tome.bipartite_round`.
    Returns:
        merged tokens ``[B, m - r, C]`` (kept A tokens in order, then B) and ``dst [B, m]``.
    """
    from ..selection import gumbel_noise, relaxed_topk_mask

    b, m, _ = x.shape
    mn = F.normalize(metric.float(), dim=-1)
    a, bset = mn[:, ::2], mn[:, 1::2]
    ta, tb = a.shape[1], bset.shape[1]
    scores = torch.matmul(a, bset.transpose(1, 2))  # [B, ta, tb]
    if cost_scale is not None:
        c = cost_scale.float()
        scores = (scores - 1.0) * (1.0 + c[:, ::2, None] + c[:, None, 1::2])
    best, match = scores.max(dim=-1)  # [B, ta]
    if penalty is not None:
        best = best - penalty[:, ::2].float()
    score = best + temperature * gumbel_noise(best.shape, like=best, generator=generator)
    soft = relaxed_topk_mask(score, r, temperature)
    removed = top_indices(score.detach(), r)
    hard = torch.zeros_like(soft).scatter_(1, removed, 1.0)
    rho = hard + soft - soft.detach()  # [B, ta]
    # dst as bipartite_round builds it: kept A tokens first, in order, then B
    keep = (1.0 - hard).bool()
    kept = ta - r
    rank = keep.long().cumsum(dim=1) - 1
    dst_a = torch.where(keep, rank, kept + match)
    dst = torch.empty(b, m, dtype=torch.long, device=x.device)
    dst[:, ::2] = dst_a
    dst[:, 1::2] = kept + torch.arange(tb, device=x.device)
    acc = torch.promote_types(x.dtype, torch.float32)
    xa, xb = x[:, ::2].to(acc), x[:, 1::2].to(acc)
    wa, wb = weight[:, ::2].to(acc) * rho, weight[:, 1::2].to(acc)
    num = (xb * wb[..., None]).scatter_add(1, match[..., None].expand(-1, -1, x.shape[-1]), xa * wa[..., None])
    den = wb.scatter_add(1, match, wa)
    merged_b = num / den[..., None]
    kept_a = xa[keep].view(b, kept, x.shape[-1])  # every row keeps exactly ta - r A tokens
    return torch.cat([kept_a, merged_b], dim=1).to(x.dtype), dst
