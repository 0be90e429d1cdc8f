"""Per-image budgets: images whose content is simple merge more, run in sub-batches bucketed by budget.

The router is QuickMerge++'s entropy estimator applied to the input, before any block runs:
the effective number of patches holding the image's content, ``exp(H(p))`` with ``p_i``
proportional to how far patch i's pixels lie from the image's median (its background). A
small object on a plain background scores low and can lose many tokens; a textured image
scores high. Images are sorted into ``buckets`` by this score (thresholds: quantiles on
calibration images); bucket k merges ``r[k]`` tokens per block, in inverse proportion to its
calibration images' mean score, scaled so that the mean cost over the calibration images is
the constant-r schedule's. Each bucket runs as its own sub-batch, so every sequence in a
sub-batch has the same length: no padding, no masks, and the merged tokens are not computed.
Padding one batch instead would cost every image the tokens of the least-merged one (on 2 CPU
cores, 1.3-1.7x slower than the buckets: ``benchmarks/vision_padding_bound.py``). Splitting a
batch changes its speed by itself (the unpatched model ran 1.2-1.45x faster in four sub-batches
of ~64 than in one of 256 there), so speed-ups are measured against the unpatched model run on
the same sub-batches (:func:`quickmerge.eval.vision.evaluate_setting`).

Past ToMe's cap (greedy matching, ``bipartite=False``) a bucket's r runs as a per-block schedule
down to a floor of tokens; given the blocks' attention perplexity, each bucket's schedule is
itself an entropy schedule (budgets per image and per block). Neither beat the per-block entropy
schedule alone on held-out images (BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .budget import DEFAULT_FLOOR, constant_schedule, entropy_schedule, schedule_cost, token_counts


def content_perplexity(images: Tensor, patch_size: int) -> Tensor:
    """``[N]`` effective number of content patches of ``images [N, C, H, W]`` (1 for a constant image).

    Invariant to the images' affine normalisation (a positive scale and a shift), so raw and
    model-ready pixels give the same score.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    x = images.float()
    background = x.flatten(1).median(dim=1).values
    deviation = (x - background[:, None, None, None]).abs()
    mass = F.avg_pool2d(deviation, patch_size).mean(dim=1).flatten(1)  # [N, patches]
    p = mass / mass.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (-torch.special.xlogy(p, p).sum(dim=1)).exp()


@dataclass
class ImageBudget:
    """Bucket thresholds on :func:`content_perplexity` (ascending ``[K - 1]``) and r per bucket ``[K]``.

    ``schedules``: optionally each bucket's tokens merged per block ``[K][L]``, run instead of a constant r
    (greedy schedules past ToMe's cap, entropy schedules); ``r`` then names each bucket's constant-r cost.
    """

    thresholds: list[float]
    r: list[int]
    patch_size: int
    schedules: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if len(self.r) != len(self.thresholds) + 1 or sorted(self.thresholds) != list(self.thresholds):
            raise ValueError(f"need ascending thresholds and one r per bucket, got {self.thresholds}, {self.r}")
        if self.schedules is not None and len(self.schedules) != len(self.r):
            raise ValueError(f"need one schedule per bucket ({len(self.r)}), got {len(self.schedules)}")

    def assign(self, images: Tensor) -> Tensor:
        """``[N]`` bucket of each image (0: the simplest content)."""
        score = content_perplexity(images, self.patch_size)
        return torch.bucketize(score, torch.tensor(self.thresholds, device=score.device))

    def sub_batches(self, images: Tensor) -> list[tuple[int | list[int], Tensor]]:
        """``(r, index)`` of each non-empty bucket of ``images [N, ...]``: its r (or per-block schedule) and its
        images' indices ``[n_k]``."""
        bucket = self.assign(images)
        rs = self.r if self.schedules is None else self.schedules
        return [(r, index) for k, r in enumerate(rs) if (index := (bucket == k).nonzero().squeeze(1)).numel()]

    def to_dict(self) -> dict[str, Any]:
        out = {"thresholds": list(self.thresholds), "r": list(self.r), "patch_size": self.patch_size}
        return out if self.schedules is None else {**out, "schedules": [list(s) for s in self.schedules]}

    @classmethod
    def calibrate(cls, images: Tensor, *, patch_size: int, num_tokens: int, num_layers: int, r: int,
                  buckets: int = 4, floor: int = DEFAULT_FLOOR, bipartite: bool = True,
                  perplexity: list[float] | None = None) -> ImageBudget:
        """Fit thresholds and per-bucket r on calibration ``images`` at the cost of a constant ``r``.

        ``num_tokens``: mergeable tokens entering the first block; cost as in
        :func:`~quickmerge.vision.budget.schedule_cost`, averaged over the calibration images
        (never above the constant schedule's; equal score everywhere gives ``r`` back).
        ``bipartite=False``: the handle merges greedily (no cap at half the tokens), and each bucket runs its
        r down to ``floor`` tokens as a per-block schedule, as the constant schedule it is costed against.
        ``perplexity``: the blocks' attention perplexity (:func:`~quickmerge.vision.budget.block_attention_perplexity`);
        each bucket then runs the entropy schedule of its r.
        """
        if buckets < 1 or r < 0 or len(images) < buckets:
            raise ValueError(f"need buckets >= 1, r >= 0 and at least `buckets` images, got {buckets}, {r}, "
                             f"{len(images)}")
        if perplexity is not None and len(perplexity) != num_layers:
            raise ValueError(f"perplexity needs one value per block ({num_layers}), got {len(perplexity)}")
        score = content_perplexity(images, patch_size)
        thresholds = score.quantile(torch.linspace(0, 1, buckets + 1)[1:-1].to(score)).tolist()
        bucket = torch.bucketize(score, torch.tensor(thresholds, device=score.device))
        share = torch.bincount(bucket, minlength=buckets).float() / len(score)
        mean = torch.stack([score[bucket == k].mean() if share[k] > 0 else score.mean() for k in range(buckets)])
        weights = (mean.min() / mean).tolist()  # 1 for the simplest bucket
        per_block = perplexity is not None or not bipartite

        def schedule(x: int) -> list[int]:
            if perplexity is not None:
                return entropy_schedule(perplexity, num_tokens, x, floor=floor, bipartite=bipartite)
            return constant_schedule(num_tokens, x, num_layers, floor, bipartite=bipartite)

        def cost(x: int) -> int:
            merges = [float(m) for m in schedule(x)] if per_block else [float(x)] * num_layers
            return schedule_cost(token_counts(num_tokens, merges, floor, bipartite=bipartite))

        def cost_of(rs: list[int]) -> float:
            return sum(float(s) * cost(x) for s, x in zip(share, rs, strict=True))

        def rs_at(scale: float) -> list[int]:
            return [min(round(scale * w), num_tokens) for w in weights]  # past num_tokens a bucket merges no more

        budget = schedule_cost(token_counts(num_tokens, [float(r)] * num_layers, floor, bipartite=bipartite))
        lo, hi = 0.0, num_tokens / min(weights)  # at this scale even the hardest bucket asks for every token
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            if cost_of(rs_at(mid)) <= budget:
                hi = mid
            else:
                lo = mid
        rs = rs_at(hi)  # within budget: the search starts where every bucket merges all it can, the least cost
        return cls(thresholds, rs, patch_size, [schedule(x) for x in rs] if per_block else None)


def bucketed_forward(model: nn.Module, handle: Any, images: Tensor, budget: ImageBudget,
                     after: Callable[[Tensor], None] | None = None) -> tuple[Tensor, float]:
    """Outputs of ``model`` on ``images [N, ...]`` with each bucket's r, and the mean tokens entering a block.

    ``handle``: the model's :class:`~quickmerge.vision.patch.MergeHandle`; its ``r`` is restored after.
    One forward pass per non-empty bucket (a loop over the few buckets, not over images); ``after(index)`` is
    called after each, with the indices ``[n_k]`` of its images (to read the handle's state for them).
    """
    out: Tensor | None = None
    tokens = 0.0
    saved = handle.r
    try:
        for r, index in budget.sub_batches(images):
            handle.r = r
            logits = model(images[index])
            if out is None:
                out = logits.new_empty((len(images), *logits.shape[1:]))
            out[index] = logits
            tokens += handle.mean_tokens * index.numel()
            if after is not None:
                after(index)
    finally:
        handle.r = saved
    assert out is not None  # every image lies in some bucket
    return out, tokens / len(images)
