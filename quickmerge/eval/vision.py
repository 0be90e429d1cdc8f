"""The image protocol: top-1 on the whole Fashion-MNIST test set vs throughput, per merging setting.

For each (method, r): accuracy over every test image, images/s of the patched model and of
the unpatched one timed alternately on the same batch in the same run (their ratio is the
speed-up that counts), and the mean number of tokens entering a block.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .._optional import require
from ..data.fashion_mnist import normalize
from ..distributed import Context
from ..vision.image_budget import ImageBudget, bucketed_forward
from ..vision.patch import patch
from ..vision.token_scorer import TokenScorer
from .journal import Journal


def _timed(fn: Any, device: torch.device) -> float:
    """Seconds ``fn()`` takes, including the kernels it queued on ``device`` (CUDA runs asynchronously)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda _: None
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.inference_mode()
def evaluate_setting(
    model: nn.Module,
    reference: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    method: str | None,
    r: Any,
    batch_size: int,
    timing_rounds: int,
    settings: dict[str, Any] | None = None,
    ctx: Context | None = None,
    scorer: TokenScorer | None = None,
) -> dict[str, Any] | None:
    """Accuracy, speed-up and mean tokens of one setting (``method=None``: unpatched).

    ``settings`` are passed to :func:`~quickmerge.vision.patch.patch`, except ``label``: the
    name the row carries instead of ``method`` (an entropy schedule of QuickMerge++, say), and
    ``image_budget``: an :class:`~quickmerge.vision.image_budget.ImageBudget` as a dict, run
    bucketed (each image at its bucket's r; routing and sub-batches are inside the timing, and the
    unpatched reference is timed on the same sub-batches).

    ``reference`` is an unpatched copy of ``model``; the two are timed alternately on the
    same batch, so drifts in machine speed hit both alike: the speed-up is the median over rounds of
    each round's ratio (images/s are medians of each side's times). Under ``torch.distributed`` the
    batches are shared out by rank and the counts summed; rank 0 alone times (the others
    wait, so they do not slow it down) and returns the row, the others return None.
    """
    ctx = ctx or Context()
    device = next(model.parameters()).device
    settings = settings or {}
    options = {k: v for k, v in settings.items() if k not in ("label", "image_budget")}
    if method == "quickmerge" and scorer is not None:  # a fine-tune's learned saliency, timed with the rest
        options["scorer"] = scorer
    handle = patch(model, r=r, method=method, **options) if method is not None else None
    budget = ImageBudget(**settings["image_budget"]) if "image_budget" in settings else None

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if budget is not None:
            return bucketed_forward(model, handle, x, budget)
        logits = model(x)
        return logits, handle.mean_tokens if handle is not None else 0.0

    try:
        correct = tokens = batches = 0
        for i in ctx.shard(range(0, len(images), batch_size)):
            if handle is not None:
                handle.configure(seed=i)  # random dropping draws per batch, whichever process runs it
            logits, mean_tokens = forward(normalize(images[i : i + batch_size].to(device)))
            correct += int((logits.argmax(-1) == labels[i : i + batch_size].to(device)).sum())
            tokens += mean_tokens
            batches += 1
        correct, tokens, batches = ctx.sum(correct), ctx.sum(tokens), ctx.sum(batches)
        batch = normalize(images[:batch_size].to(device))
        # bucketed budgets run sub-batches, and splitting a batch alone changes its speed (a CPU's caches): the
        # unpatched reference runs the same sub-batches, so the speed-up is what merging saves
        parts = [index for _, index in budget.sub_batches(batch)] if budget is not None else [None]

        def reference_forward() -> None:
            for index in parts:
                reference(batch if index is None else batch[index])

        ours, base = [], []
        if ctx.main:
            for _ in range(timing_rounds):
                ours.append(_timed(lambda: forward(batch), device))
                base.append(_timed(reference_forward, device))
        ctx.barrier()
    finally:
        if handle is not None:
            handle.remove()
    if not ctx.main:
        return None
    if handle is None:
        with patch(model, r=0) as counter:  # r=0: the unpatched model's computation, counted
            model(batch[:1])
            tokens, batches = counter.mean_tokens, 1
    t_ours, t_base = statistics.median(ours), statistics.median(base)
    # each round's ratio pairs two timings a moment apart: the machine's drifts (2x here) cancel within a pair
    ratios = [b / o for b, o in zip(base, ours, strict=True)]
    return {
        "method": settings.get("label", method or "none"),
        "r": list(r) if isinstance(r, tuple) else r,
        "settings": settings,
        "accuracy": correct / len(images),
        "images": len(images),
        "images_per_s": batch.shape[0] / t_ours,
        "unpatched_images_per_s": batch.shape[0] / t_base,
        "speedup": statistics.median(ratios),
        "speedup_per_round": ratios,
        "timing_sub_batches": [len(batch) if index is None else index.numel() for index in parts],
        "mean_tokens_per_layer": tokens / batches,
    }


def run_vision_eval(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sweep: Iterable[tuple[str, Any, dict[str, Any]]],
    *,
    batch_size: int = 256,
    timing_rounds: int = 5,
    journal: Journal | None = None,
    ctx: Context | None = None,
    scorer: TokenScorer | None = None,
) -> list[dict[str, Any]] | None:
    """Unpatched first, then every (method, r, settings) of ``sweep``; a progress bar over settings.

    ``scorer``: the learned saliency of a fine-tuned checkpoint, used by every QuickMerge++ setting.
    With a ``journal``, each finished setting is on disk at once and settings already there are
    not run again. Returns the rows on rank 0, None on the other ranks.
    """
    tqdm = require("tqdm", "progress", "The evaluation progress bar").tqdm
    ctx = ctx or Context()
    jobs = [(None, 0, {}), *sweep]
    done = ctx.broadcast(journal.open() if journal is not None and ctx.main else {})
    reference = copy.deepcopy(model).eval()
    rows = []
    bar = tqdm(jobs, desc="vision eval", unit="setting", disable=not ctx.main)
    for method, r, settings in bar:
        key = json.dumps([method or "none", list(r) if isinstance(r, tuple) else r, settings], sort_keys=True)
        if key in done:
            rows.append(done[key])
            continue
        bar.set_postfix(method=method or "none", r=str(r))
        row = evaluate_setting(model, reference, images, labels, method=method, r=r, batch_size=batch_size,
                               timing_rounds=timing_rounds, settings=settings, ctx=ctx, scorer=scorer)
        if row is not None and journal is not None:
            journal.add(key, row)
        rows.append(row)
    return rows if ctx.main else None


def accuracy_at(rows: Sequence[dict[str, Any]], speedup: float) -> float | None:
    """A method's accuracy at ``speedup``, linearly interpolated between its own measured settings."""
    pts = sorted((row["speedup"], row["accuracy"]) for row in rows)
    if not pts or not pts[0][0] <= speedup <= pts[-1][0]:
        return None
    for (s0, a0), (s1, a1) in itertools.pairwise(pts):
        if s0 <= speedup <= s1:
            return a0 if s1 == s0 else a0 + (a1 - a0) * (speedup - s0) / (s1 - s0)
    return pts[-1][1]


def compare_at_tome_speeds(
    rows: Sequence[dict[str, Any]], method: str = "quickmerge", reference: str = "tome"
) -> list[dict[str, Any]]:
    """For each ``reference`` point (ToMe-style by default): ``method``'s interpolated accuracy at its speed-up."""
    ours = [r for r in rows if r["method"] == method]
    out = []
    for row in (r for r in rows if r["method"] == reference):
        acc = accuracy_at(ours, row["speedup"])
        out.append({"r": row["r"], "speedup": row["speedup"], f"{reference}_accuracy": row["accuracy"],
                    f"{method}_accuracy": acc, "difference": None if acc is None else acc - row["accuracy"]})
    return out


_NAMES = {"quickmerge": "QuickMerge++", "quickmerge-entropy": "QuickMerge++, entropy schedule",
          "quickmerge-per-image": "QuickMerge++, per-image budget", "tome": "ToMe-style"}


def method_label(method: str, rows: Sequence[dict[str, Any]]) -> str:
    """A method's name in the plot's legend, saying when its rows matched greedily (past ToMe's cap)."""
    greedy = any(row.get("settings", {}).get("matching") == "greedy" for row in rows if row["method"] == method)
    return _NAMES.get(method, method) + (", greedy matching" if greedy else "")


def plot_vision_eval(rows: Sequence[dict[str, Any]], path: str, title: str) -> None:
    """Top-1 vs speed-up over the unpatched model, one line per method; right: QuickMerge++ vs ToMe zoomed."""
    plt = require("matplotlib.pyplot", "plot", "The vision plot")
    base = 100 * next(r for r in rows if r["method"] == "none")["accuracy"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"quickmerge": ("C3", "o"), "quickmerge-entropy": ("C1", "D"), "quickmerge-per-image": ("C4", "v"),
              "tome": ("C0", "s"), "random": ("C7", "x"), "pool": ("C2", "^")}
    zoom = ["quickmerge", "quickmerge-entropy", "quickmerge-per-image", "tome"]
    for ax, methods in zip(axes, (list(styles), zoom), strict=True):
        shown = [r for r in rows if r["method"] in methods]
        for method in [m for m in methods if any(r["method"] == m for r in rows)]:
            pts = sorted(((r["speedup"], 100 * r["accuracy"], r["r"]) for r in rows if r["method"] == method),
                         key=lambda p: p[:2])
            colour, marker = styles[method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour,
                    label=method_label(method, rows))
            if methods is zoom and method in ("quickmerge", "tome"):
                for x, y, r in (p for p in pts if isinstance(p[2], int)):  # per-block lists would crowd the plot
                    ax.annotate(f"r={r}", (x, y), fontsize=6, color=colour, xytext=(3, 3), textcoords="offset points")
        ax.axhline(base, color="k", lw=0.8, ls="--", label=f"unpatched {base:.2f}%")
        ax.axhline(base - 1.0, color="k", lw=0.6, ls=":", label="unpatched - 1 pt")
        ax.axvline(1.8, color="k", lw=0.6, ls=":")
        lo = min([100 * r["accuracy"] for r in shown] or [base - 1])
        ax.set_ylim(max(lo - 0.5, base - 25), base + 0.5)
        ax.set_xlabel("throughput / unpatched throughput (same run)")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title(title)
    axes[1].set_title("QuickMerge++ vs ToMe-style (zoom)" if any(r["method"] == "tome" for r in rows)
                      else "QuickMerge++ (zoom)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
