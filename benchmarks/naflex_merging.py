"""Merging methods compared on a NaFlex model, the part ``siglip2_naflex.py`` and ``timm_naflex.py`` share.

On padded test batches: each method's top-1, KL divergence from the unmerged model's softmax (nats) and top-1
agreement with it, per image, at every r; images/s of every setting against the unpatched model, timed interleaved
(the order rotating each round); each method minus ToMe-style, paired over the same images, with 95% bootstrap
intervals; a figure of top-1 and KL against the speed-up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from reporting import figure, interval_line, save_figure
from torch import nn
from tqdm import tqdm

from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.vision import patch

Batch = dict[str, torch.Tensor]


def log_probs(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.log_softmax(model(b).double(), -1) for b in batches])


def timed(model: nn.Module, target: nn.Module, batches: list[Batch], settings: list[dict | None],
          rounds: int) -> list[float]:
    """Images/s of each setting (None: unpatched; else ``target`` patched with it), all timed in each round, the
    order rotating per round."""
    seconds = [0.0] * len(settings)
    images = sum(len(next(iter(b.values()))) for b in batches)
    for k in tqdm(range(rounds), desc="timing rounds"):
        for j in range(len(settings)):
            i = (j + k) % len(settings)
            with torch.no_grad():
                handle = None if settings[i] is None else patch(target, **settings[i])
                began = time.perf_counter()
                for b in batches:
                    model(b)
                seconds[i] += time.perf_counter() - began
                if handle is not None:
                    handle.remove()
    return [rounds * images / s for s in seconds]


def compare(model: nn.Module, target: nn.Module, batches: list[Batch], labels: torch.Tensor,
            methods: dict[str, dict], rs: list[int], timing_images: int, timing_rounds: int) -> dict[str, Any]:
    """``rows`` (one per method and r) and ``comparisons`` (each method minus ``"tome"`` at each r) of the test
    batches, with ``unmerged_top1`` and ``unpatched_images_per_s``; ``target`` is the module patched."""
    reference = log_probs(model, batches)
    unmerged_top1 = (reference.argmax(-1) == labels).double().tolist()
    names = [(m, r) for r in rs for m in methods]
    settings = [dict(methods[m], r=r) for m, r in names]
    runs = {}
    for (name, r), s in tqdm(list(zip(names, settings, strict=True)), desc="merging settings"):
        with patch(target, **s) as handle:
            merged = log_probs(model, batches)
            tokens = handle.mean_tokens
        kl = (reference.exp() * (reference - merged)).sum(-1)
        runs[f"{name}/r={r}"] = {
            "method": name, "settings": s, "r": r, "mean_tokens_per_block": tokens, "kl": kl.tolist(),
            "agreement": (merged.argmax(-1) == reference.argmax(-1)).double().tolist(),
            "top1": (merged.argmax(-1) == labels).double().tolist()}
    per_batch = len(next(iter(batches[0].values())))
    speed = timed(model, target, batches[: max(1, timing_images // per_batch)], [None, *settings], timing_rounds)
    rows, comparisons = [], []
    for run, images_per_s in zip(runs.values(), speed[1:], strict=True):
        rows.append({k: v for k, v in run.items() if k not in ("kl", "agreement", "top1")}
                    | {m: bootstrap_mean(run[m]) for m in ("kl", "agreement", "top1")}
                    | {"top1_minus_unmerged": bootstrap_difference(run["top1"], unmerged_top1),
                       "images_per_s": images_per_s, "speedup": images_per_s / speed[0]})
    for r in rs:
        for name in (m for m in methods if m != "tome" and "tome" in methods):
            qm, tome = runs[f"{name}/r={r}"], runs[f"tome/r={r}"]
            comparisons.append({"r": r, "what": f"{name} minus tome",
                                **{m: bootstrap_difference(qm[m], tome[m]) for m in ("kl", "agreement", "top1")}})
    return {"unmerged_top1": bootstrap_mean(unmerged_top1), "unpatched_images_per_s": speed[0], "rows": rows,
            "comparisons": comparisons,
            "note": "each entry (mean, low, high): mean over the test images and its 95% bootstrap interval; "
                    "comparisons are paired over the same images (kl: lower is closer to the unmerged model); "
                    "images/s from the interleaved timing rounds, speed-up against the unpatched model timed "
                    "in the same rounds"}


def plot(result: dict, path: Path, labels: dict[str, str], title: str) -> None:
    """Top-1 and KL to the unmerged model against the speed-up, one line per method."""
    fig, axes = figure()
    for method, label in labels.items():
        rows = [r for r in result["rows"] if r["method"] == method]
        if not rows:
            continue
        speed = [r["speedup"] for r in rows]
        for ax, metric, scale in ((axes[0], "top1", 100), (axes[1], "kl", 1)):
            interval_line(ax, speed, [r[metric] for r in rows], label, scale=scale)
    axes[0].axhline(100 * result["unmerged_top1"][0], color="gray", ls="--", label="unmerged")
    axes[0].set(xlabel="speed-up over the unpatched model", ylabel="top-1 (%)", title=title)
    axes[1].set(xlabel="speed-up over the unpatched model", ylabel="KL(unmerged || merged), nats",
                title="distance from the unmerged model")
    save_figure(fig, axes, path)


def print_result(result: dict) -> None:
    print(f"unmerged top1 {result['unmerged_top1'][0]:.4f}, padding share {result['padding_share']:.3f}")
    for row in result["rows"]:
        print(f"{row['method']:>17} r={row['r']:<3} tokens {row['mean_tokens_per_block']:.1f} top1 "
              f"{row['top1'][0]:.4f} KL {row['kl'][0]:.5f} speed-up {row['speedup']:.2f}x")
    for c in result["comparisons"]:
        print(f"r={c['r']:<3} {c['what']} KL {c['kl'][0]:+.5f} [{c['kl'][1]:+.5f}, {c['kl'][2]:+.5f}] "
              f"top1 {c['top1'][0]:+.4f} [{c['top1'][1]:+.4f}, {c['top1'][2]:+.4f}]")
