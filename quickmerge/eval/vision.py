"""The image protocol: top-1 on the whole Fashion-MNIST test set vs throughput, per merging setting.

For each (method, r): accuracy over every test image and which images it got right (``hits``,
:func:`pack_hits`), images/s of the patched model and of the unpatched one timed alternately on
the same batch in the same run (their ratio is the speed-up that counts), and the mean number of
tokens entering a block. :func:`compare_at_tome_speeds` sets methods side by side at equal
speed-up, with paired intervals from the hits.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
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
from .stats import bootstrap_mean
from .timing import clock, cpu_counters, steal_share


def _timed(fn: Any, device: torch.device) -> float:
    """Seconds ``fn()`` takes, including the kernels it queued on ``device`` (CUDA runs asynchronously)."""
    start = clock(device)
    fn()
    return clock(device) - start


TIMINGS = ("together", "paired")


class _Setting:
    """One (method, r, settings) on ``model``: patched on entry (unpatched for ``method=None``), removed on exit.

    ``forward(x)`` returns the logits and the mean tokens entering a block; ``reference(x)`` runs the unpatched
    ``reference`` model on the same (sub-)batches, so a bucketed budget's speed-up is what merging saves.
    """

    def __init__(self, model: nn.Module, reference: nn.Module, method: str | None, r: Any,
                 settings: dict[str, Any] | None, scorer: TokenScorer | None) -> None:
        settings = settings or {}
        options = {k: v for k, v in settings.items() if k not in ("label", "image_budget")}
        if method == "quickmerge" and scorer is not None:  # a fine-tune's learned saliency, timed with the rest
            options["scorer"] = scorer
        self.model, self.reference_model = model, reference
        self.handle = patch(model, r=r, method=method, **options) if method is not None else None
        self.budget = ImageBudget(**settings["image_budget"]) if "image_budget" in settings else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.budget is not None:
            return bucketed_forward(self.model, self.handle, x, self.budget)
        logits = self.model(x)
        return logits, self.handle.mean_tokens if self.handle is not None else 0.0

    def parts(self, batch: torch.Tensor) -> list[torch.Tensor | None]:
        """The sub-batches the setting runs ``batch`` in (bucketed budgets), or ``[None]``: the whole batch."""
        return [index for _, index in self.budget.sub_batches(batch)] if self.budget is not None else [None]

    def reference(self, batch: torch.Tensor, parts: list[torch.Tensor | None]) -> None:
        # splitting a batch alone changes its speed (a CPU's caches): the reference runs the same sub-batches
        for index in parts:
            self.reference_model(batch if index is None else batch[index])

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


def _timing_fields(batch_size: int, ours: list[float], base: list[float], parts: list,
                   steal: float | None = None) -> dict[str, Any]:
    """Images/s (medians of each side's seconds) and the speed-up: the median over rounds of each round's
    ratio (unpatched / merged, timed a moment apart, so the machine's drifts cancel within a pair). The seconds
    of every round are kept too (``seconds_per_round``, ``unpatched_seconds_per_round``; timed together, round
    ``i`` of every setting ran in the same round), so other estimators can be computed from a finished run;
    ``timing_steal_share``: the host's steal while they were timed (:func:`~quickmerge.eval.timing.steal_share`),
    where it could be read."""
    ratios = [b / o for b, o in zip(base, ours, strict=True)]
    fields = {"images_per_s": batch_size / statistics.median(ours),
              "unpatched_images_per_s": batch_size / statistics.median(base),
              "speedup": statistics.median(ratios), "speedup_per_round": ratios,
              "seconds_per_round": list(ours), "unpatched_seconds_per_round": list(base),
              "timing_sub_batches": [batch_size if index is None else index.numel() for index in parts]}
    return fields if steal is None else fields | {"timing_steal_share": steal}


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
    same batch, ``timing_rounds`` times (:func:`_timing_fields`; 0: no timing, the row has no speed
    fields, as :func:`time_settings_together` fills them). Under ``torch.distributed`` the
    batches are shared out by rank and the counts summed; rank 0 alone times (the others
    wait, so they do not slow it down) and returns the row, the others return None.
    """
    ctx = ctx or Context()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    setting = _Setting(model, reference, method, r, settings, scorer)
    try:
        tokens = batches = 0
        hits = torch.zeros(len(images), dtype=torch.bool)  # this rank's batches filled in
        for i in ctx.shard(range(0, len(images), batch_size)):
            if setting.handle is not None:
                setting.handle.configure(seed=i)  # random dropping draws per batch, whichever process runs it
            logits, mean_tokens = setting.forward(normalize(images[i : i + batch_size].to(device), dtype))
            hits[i : i + batch_size] = (logits.argmax(-1) == labels[i : i + batch_size].to(device)).cpu()
            tokens += mean_tokens
            batches += 1
        tokens, batches = ctx.sum(tokens), ctx.sum(batches)
        shards = ctx.gather(pack_hits(hits))
        if shards is not None:  # rank 0: every rank's batches, each image filled by the one rank that ran it
            hits = torch.stack([unpack_hits(shard, len(images)) for shard in shards]).any(dim=0)
        batch = normalize(images[:batch_size].to(device), dtype)
        parts = setting.parts(batch)
        ours, base, steal = [], [], None
        if ctx.main and timing_rounds:
            before = cpu_counters()
            for _ in range(timing_rounds):
                ours.append(_timed(lambda: setting.forward(batch), device))
                base.append(_timed(lambda: setting.reference(batch, parts), device))
            steal = steal_share(before, cpu_counters())
        ctx.barrier()
    finally:
        setting.remove()
    if not ctx.main:
        return None
    if method is None:
        with patch(model, r=0) as counter:  # r=0: the unpatched model's computation, counted
            model(batch[:1])
            tokens, batches = counter.mean_tokens, 1
    row = {
        "method": (settings or {}).get("label", method or "none"),
        "r": list(r) if isinstance(r, tuple) else r,
        "settings": settings or {},
        "accuracy": int(hits.sum()) / len(images),
        "images": len(images),
        "hits": pack_hits(hits),
        "mean_tokens_per_layer": tokens / batches,
    }
    return row | _timing_fields(batch.shape[0], ours, base, parts, steal) if timing_rounds else row


@torch.inference_mode()
def time_settings_together(
    model: nn.Module, jobs: Sequence[tuple[str | None, Any, dict[str, Any]]], batch: torch.Tensor, rounds: int, *,
    scorer: TokenScorer | None = None,
) -> list[dict[str, Any]]:
    """Speed-up fields of every ``(method, r, settings)`` of ``jobs`` (as :func:`evaluate_setting`'s), timed together.

    Each setting runs on a patched copy of ``model`` of its own; every round times each setting once and the
    unpatched model right after it (on the same sub-batches), in an order that rotates from round to round. So
    every setting is timed across the same stretch of the run: the machine's drift over minutes, which moved
    speed-ups of settings timed one after another by up to 20% here, falls on all of them alike.
    """
    tqdm = require("tqdm", "progress", "The timing progress bar").tqdm
    device = batch.device
    reference = copy.deepcopy(model).eval()
    settings = [_Setting(copy.deepcopy(model).eval(), reference, method, r, options, scorer)
                for method, r, options in jobs]
    try:
        parts = [setting.parts(batch) for setting in settings]
        ours: list[list[float]] = [[] for _ in settings]
        base: list[list[float]] = [[] for _ in settings]
        for k, setting in enumerate(settings):  # warm-up
            setting.forward(batch)
            setting.reference(batch, parts[k])
        before = cpu_counters()
        for i in tqdm(range(rounds), desc="timing together", unit="round"):
            for k in [*range(i % len(settings), len(settings)), *range(i % len(settings))]:
                ours[k].append(_timed(lambda k=k: settings[k].forward(batch), device))
                base[k].append(_timed(lambda k=k: settings[k].reference(batch, parts[k]), device))
        steal = steal_share(before, cpu_counters())  # one figure for all: their rounds share the stretch
    finally:
        for setting in settings:
            setting.remove()
    return [_timing_fields(batch.shape[0], o, b, p, steal) for o, b, p in zip(ours, base, parts, strict=True)]


def run_vision_eval(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    sweep: Iterable[tuple[str, Any, dict[str, Any]]],
    *,
    batch_size: int = 256,
    timing_rounds: int = 5,
    timing: str = "paired",
    journal: Journal | None = None,
    ctx: Context | None = None,
    scorer: TokenScorer | None = None,
) -> list[dict[str, Any]] | None:
    """Unpatched first, then every (method, r, settings) of ``sweep``; a progress bar over settings.

    ``timing``: ``"paired"`` times each setting against the unpatched model in rounds of its own, right after
    its accuracy pass; ``"together"`` times every setting after all accuracy passes, in rotating rounds
    (:func:`time_settings_together`). ``scorer``: the learned saliency of a fine-tuned checkpoint, used by every
    QuickMerge++ setting. With a ``journal``, each finished setting's accuracy (and paired timing) is on disk at
    once and settings already there are not run again; the together timing always times every setting.
    Returns the rows on rank 0, None on the other ranks.
    """
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
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
                               timing_rounds=timing_rounds if timing == "paired" else 0, settings=settings, ctx=ctx,
                               scorer=scorer)
        if row is not None and journal is not None:
            journal.add(key, row)
        rows.append(row)
    if timing == "together":
        if ctx.main:
            parameter = next(model.parameters())
            batch = normalize(images[:batch_size].to(parameter.device), parameter.dtype)
            timed = time_settings_together(model, jobs, batch, timing_rounds, scorer=scorer)
            rows = [row | fields for row, fields in zip(rows, timed, strict=True)]
        ctx.barrier()
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


def pack_hits(hits: torch.Tensor) -> str:
    """``[N]`` bool per-image hits as a hex string, 8 images a byte, the first image the highest bit."""
    bits = torch.cat([hits.bool().cpu(), hits.new_zeros(-len(hits) % 8, dtype=torch.bool).cpu()]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)
    return bytes((bits.int() * weights).sum(dim=1).to(torch.uint8).tolist()).hex()


def unpack_hits(text: str, n: int) -> torch.Tensor:
    """The ``[n]`` bool hits :func:`pack_hits` wrote."""
    data = bytes.fromhex(text)
    if len(data) != (n + 7) // 8:
        raise ValueError(f"packed hits of {len(data)} bytes cannot hold {n} images ({(n + 7) // 8} bytes)")
    values = torch.tensor(list(data), dtype=torch.int32)[:, None]
    return ((values >> torch.arange(7, -1, -1, dtype=torch.int32)) & 1).flatten()[:n].bool()


def paired_difference_at(ours: Sequence[tuple[float, torch.Tensor]], speedup: float, reference: torch.Tensor, *,
                         samples: int = 2000, seed: int = 0) -> dict[str, Any] | None:
    """A method's per-image hits interpolated at ``speedup`` minus ``reference``'s hits ``[N]``: mean, 95% interval.

    ``ours``: the method's ``(speed-up, hits [N])`` settings. Between the two settings around ``speedup`` an image
    scores ``(1 - w) hit_0 + w hit_1``, ``w`` the weight :func:`accuracy_at` gives the upper one, so the mean is the
    interpolated accuracy minus the reference's; the interval is a percentile bootstrap over images (paired: the
    same images resampled for both). None outside the method's speed-ups.
    """
    found = interpolated_hits(ours, speedup)
    if found is None:
        return None
    score, (s0, s1), w = found
    mean, low, high = bootstrap_mean((score - reference.double()).tolist(), samples=samples, seed=seed)
    return {"difference": mean, "low": low, "high": high, "between_speedups": [s0, s1], "weight": w}


def interpolated_hits(ours: Sequence[tuple[float, torch.Tensor]], speedup: float
                      ) -> tuple[torch.Tensor, tuple[float, float], float] | None:
    """A method's per-image scores ``[N]`` (float64) at ``speedup``, linearly interpolated between its two settings
    around it, ``(1 - w) hit_0 + w hit_1``, with those settings' speed-ups and ``w``; None outside its speed-ups.

    ``ours``: ``(speed-up, hits [N])`` per setting, any order (equal speed-ups keep it). Their mean over images is
    :func:`accuracy_at`'s interpolated accuracy.
    """
    pts = sorted(ours, key=lambda p: p[0])
    if not pts or not pts[0][0] <= speedup <= pts[-1][0]:
        return None
    (s0, h0), (s1, h1) = next(((a, b) for a, b in itertools.pairwise(pts) if a[0] <= speedup <= b[0]),
                              (pts[-1], pts[-1]))  # one setting alone: exactly at the speed-up
    w = 0.0 if s1 == s0 else (speedup - s0) / (s1 - s0)
    return (1 - w) * h0.double() + w * h1.double(), (s0, s1), w


def compare_at_tome_speeds(
    rows: Sequence[dict[str, Any]], method: str = "quickmerge", reference: str = "tome"
) -> list[dict[str, Any]]:
    """For each ``reference`` point (ToMe-style by default): ``method``'s interpolated accuracy at its speed-up,
    the difference and, where every row carries its per-image ``hits``, the difference's paired 95% interval
    (``low``, ``high``: :func:`paired_difference_at`)."""
    ours = [r for r in rows if r["method"] == method]
    paired = all("hits" in r for r in [*ours, *(r for r in rows if r["method"] == reference)])
    hits_of = (lambda row: unpack_hits(row["hits"], row["images"])) if paired else None
    our_hits = [(r["speedup"], hits_of(r)) for r in ours] if paired else []
    out = []
    for row in (r for r in rows if r["method"] == reference):
        acc = accuracy_at(ours, row["speedup"])
        entry = {"r": row["r"], "speedup": row["speedup"], f"{reference}_accuracy": row["accuracy"],
                 f"{method}_accuracy": acc, "difference": None if acc is None else acc - row["accuracy"]}
        if paired and acc is not None:
            interval = paired_difference_at(our_hits, row["speedup"], hits_of(row))
            entry |= {"low": interval["low"], "high": interval["high"]}
        out.append(entry)
    return out


_NAMES = {"quickmerge": "QuickMerge++", "quickmerge-entropy": "QuickMerge++, entropy schedule",
          "quickmerge-per-image": "QuickMerge++, per-image budget", "tome": "ToMe-style"}


def method_label(method: str, rows: Sequence[dict[str, Any]]) -> str:
    """A method's name in the plot's legend, saying when its rows matched greedily (all, or some: past ToMe's cap)."""
    greedy = [row.get("settings", {}).get("matching") == "greedy" for row in rows if row["method"] == method]
    suffix = ", greedy matching" if greedy and all(greedy) else ", greedy past ToMe's cap" if any(greedy) else ""
    return _NAMES.get(method, method) + suffix


STYLES = {"quickmerge": ("C3", "o"), "quickmerge-entropy": ("C1", "D"), "quickmerge-per-image": ("C4", "v"),
          "tome": ("C0", "s"), "random": ("C7", "x"), "pool": ("C2", "^")}  # colour, marker of each method's line
# the comparisons against ToMe-style a plot draws with their intervals, and the method each one is of
AGAINST_TOME = {"quickmerge_vs_tome": "quickmerge", "quickmerge_entropy_vs_tome": "quickmerge-entropy",
                "quickmerge_per_image_vs_tome": "quickmerge-per-image"}


def draw_paired_differences(ax: Any, comparisons: dict[str, Sequence[dict[str, Any]]],
                            label: Callable[[str], str] | None = None) -> bool:
    """On ``ax``: each method minus ToMe-style in top-1 points at ToMe-style's speed-ups, with the paired 95%
    interval (``low``, ``high``) of each point, from :func:`compare_at_tome_speeds`-style ``comparisons`` keyed as
    :data:`AGAINST_TOME`. False (nothing drawn) when no point has an interval."""
    drawn, xs = False, []
    for shift, (key, method) in enumerate(AGAINST_TOME.items()):
        pts = [c for c in comparisons.get(key) or [] if c.get("low") is not None]
        if not pts:
            continue
        colour, marker = STYLES[method]
        x = [c["speedup"] * (1 + 0.006 * (shift - 1)) for c in pts]  # side by side, not on top of each other
        y = [100 * c["difference"] for c in pts]
        yerr = [[100 * (c["difference"] - c["low"]) for c in pts], [100 * (c["high"] - c["difference"]) for c in pts]]
        ax.errorbar(x, y, yerr=yerr, fmt=marker, color=colour, capsize=3, label=label(method) if label else method)
        drawn, xs = True, xs + x
    if drawn:
        if max(xs) - min(xs) < 0.3:  # a single speed-up: not a zoom onto the side-by-side shift
            middle = (max(xs) + min(xs)) / 2
            ax.set_xlim(middle - 0.2, middle + 0.2)
        ax.axhline(0.0, color=STYLES["tome"][0], lw=0.8, label="ToMe-style")
        ax.set_xlabel("ToMe-style's throughput / unpatched throughput")
        ax.set_ylabel("top-1 minus ToMe-style's (points)")
        ax.set_title("minus ToMe-style at equal throughput, paired 95% intervals")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return drawn


def plot_vision_eval(rows: Sequence[dict[str, Any]], path: str, title: str,
                     comparisons: dict[str, Sequence[dict[str, Any]]] | None = None) -> None:
    """Top-1 vs speed-up over the unpatched model, one line per method; middle: QuickMerge++ vs ToMe zoomed; right,
    where ``comparisons`` carry intervals: each method minus ToMe-style (:func:`draw_paired_differences`)."""
    plt = require("matplotlib.pyplot", "plot", "The vision plot")
    base = 100 * next(r for r in rows if r["method"] == "none")["accuracy"]
    paired = any(c.get("low") is not None for key in AGAINST_TOME for c in (comparisons or {}).get(key) or [])
    fig, axes = plt.subplots(1, 3 if paired else 2, figsize=(18 if paired else 12, 4.5))
    zoom = ["quickmerge", "quickmerge-entropy", "quickmerge-per-image", "tome"]
    if paired:
        draw_paired_differences(axes[2], comparisons, lambda method: method_label(method, rows))
    for ax, methods in zip(axes[:2], (list(STYLES), zoom), strict=True):
        shown = [r for r in rows if r["method"] in methods]
        for method in [m for m in methods if any(r["method"] == m for r in rows)]:
            pts = sorted(((r["speedup"], 100 * r["accuracy"], r["r"]) for r in rows if r["method"] == method),
                         key=lambda p: p[:2])
            colour, marker = STYLES[method]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=colour,
                    label=method_label(method, rows))
            if methods is zoom and method in ("quickmerge", "tome"):
                for x, y, r in (p for p in pts if isinstance(p[2], int)):  # per-block lists would crowd the plot
                    ax.annotate(f"r={r}", (x, y), fontsize=6, color=colour, xytext=(3, 3), textcoords="offset points")
        ax.axhline(base, color="k", lw=0.8, ls="--", label=f"unpatched {base:.2f}%")
        ax.axhline(base - 1.0, color="k", lw=0.6, ls=":", label="unpatched - 1 pt")
        ax.axvline(1.8, color="k", lw=0.6, ls="-.", label="1.8x (issue 4's target: at most 1 pt lost there)")
        lo = min([100 * r["accuracy"] for r in shown] or [base - 1])
        ax.set_ylim(max(min(lo - 0.5, base - 1.2), base - 25), base + 0.5)  # the 1-point line always in view
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
