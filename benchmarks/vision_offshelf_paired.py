"""Paired 95% intervals for the off-the-shelf comparisons of a timed ``eval vision`` result (issue 11's targets).

    python benchmarks/vision_offshelf_paired.py docs/results/stop77/vision_offshelf_retimed.json \
        --out docs/results/stop83/vision_offshelf_paired.json --png docs/img/vision_offshelf_paired.png
    python benchmarks/vision_offshelf_paired.py --plot-only docs/results/stop83/vision_offshelf_paired.json \
        --png docs/img/vision_offshelf_paired.png     # the plot again from a summary, nothing recomputed

``eval vision`` runs before stop 83 (and ``vision_retime.py`` on them) report each method's accuracy at
ToMe-style's speed-ups without an interval: their rows have no per-image hits. This recomputes every compared
setting's hits on the same test images (checking that each accuracy equals the row's: the same model and code give
the same hits) and, for each reference point, :func:`quickmerge.eval.vision.paired_difference_at`, the interval that
``eval vision`` now reports itself. Speed-ups are the result's own (nothing is timed here). Comparisons: QuickMerge++
(constant r) and its entropy schedule against ToMe-style, and the entropy schedule against QuickMerge++'s constant r.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from vision_retime import job_of

from quickmerge._optional import require
from quickmerge.data.fashion_mnist import load_fashion_mnist
from quickmerge.eval.vision import draw_paired_differences, evaluate_setting, paired_difference_at, unpack_hits
from quickmerge.pretrained.fashion_vit import load_fashion_vit

COMPARISONS = (("quickmerge", "tome"), ("quickmerge-entropy", "tome"), ("quickmerge-entropy", "quickmerge"))


def hits_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, row: dict[str, Any],
            batch_size: int) -> torch.Tensor:
    """``[N]`` bool: which test images the row's setting classifies correctly (``eval vision``'s own pass)."""
    method, r, settings = job_of(row, len(model.blocks))
    done = evaluate_setting(model, model, images, labels, method=method, r=r, batch_size=batch_size, timing_rounds=0,
                            settings=settings)
    return unpack_hits(done["hits"], len(images))


def plot(summary: dict, path: str) -> None:
    """Each method minus ToMe-style with its paired interval (:func:`draw_paired_differences`), one panel."""
    plt = require("matplotlib.pyplot", "plot", "The plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"quickmerge": "QuickMerge++ (default, constant r)",
              "quickmerge-entropy": "QuickMerge++, entropy schedule"}
    draw_paired_differences(ax, summary["comparisons"], labels.get)
    ax.set_title(f"Reference ViT, {summary['images']} test images: minus ToMe-style, paired 95% intervals",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", nargs="?", help="a timed eval vision JSON (e.g. vision_retime.py's) of the shipped model")
    ap.add_argument("--png", default=None, help="also draw each method minus ToMe-style with its interval here")
    ap.add_argument("--plot-only", default=None, metavar="SUMMARY",
                    help="draw --png from this script's summary JSON, computing nothing")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the result's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--out", default=None, help="summary JSON")
    args = ap.parse_args()
    if args.plot_only is not None:
        if args.png is None:
            ap.error("--plot-only draws the plot: give --png")
        plot(json.loads(Path(args.plot_only).read_text()), args.png)
        return
    if args.result is None or args.out is None:
        ap.error("give the result JSON and --out (or --plot-only SUMMARY --png PATH)")
    result = json.loads(Path(args.result).read_text())
    config = result.get("config", {})
    if config.get("checkpoint"):
        sys.exit(f"error: {args.result} was measured on {config['checkpoint']}; this script loads the shipped model")
    batch_size = args.batch_size or config.get("batch_size", 256)
    torch.set_num_threads(args.threads)
    model = load_fashion_vit().eval()
    images, labels = load_fashion_mnist("test")
    rows = [row for row in result["rows"] if row["method"] in {m for pair in COMPARISONS for m in pair}]
    hits, mismatches = [], []
    for row in tqdm(rows, desc="settings", unit="setting"):
        h = hits_of(model, images, labels, row, batch_size)
        hits.append(h)
        accuracy = h.double().mean().item()
        if abs(accuracy - row["accuracy"]) > 0.5 / len(labels):
            mismatches.append({"method": row["method"], "r": row["r"], "row": row["accuracy"], "now": accuracy})
    if mismatches:
        sys.exit(f"error: recomputed accuracies differ from {args.result}'s rows: {mismatches}")
    comparisons = {}
    for method, reference in COMPARISONS:
        ours = [(row["speedup"], h) for row, h in zip(rows, hits, strict=True) if row["method"] == method]
        out = []
        for row, h in zip(rows, hits, strict=True):
            if row["method"] != reference:
                continue
            paired = paired_difference_at(ours, row["speedup"], h, samples=args.samples)
            out.append({"r": row["r"], "speedup": row["speedup"], "reference_accuracy": row["accuracy"], **(paired or {
                "difference": None})})
        comparisons[f"{method}_vs_{reference}".replace("-", "_")] = out
    summary = {"result": args.result, "comparisons": comparisons, "images": len(labels),
               "config": {"command": " ".join(["benchmarks/vision_offshelf_paired.py", *sys.argv[1:]]),
                          "batch_size": batch_size, "threads": args.threads, "samples": args.samples,
                          "torch": torch.__version__, "platform": platform.platform()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    if args.png is not None:
        plot(summary, args.png)
    for name, out in comparisons.items():
        print(name)
        for c in out:
            if c["difference"] is not None:
                print(f"  r={c['r']} speed-up {c['speedup']:.2f}x: {100 * c['difference']:+.2f} pt "
                      f"[{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]")


if __name__ == "__main__":
    main()
