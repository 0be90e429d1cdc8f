"""Paired top-1 differences of QuickMerge++ and ToMe-style at equal r on all 10,000 test images, 90.85% model.

    python benchmarks/exploration/vision_paired_r64.py      # r = 56, 64 (past the default grid): about 5 minutes
    python benchmarks/exploration/vision_paired_r64.py --r 16 24 32 40 48 --schedules constant entropy per-image \
        --out results/vision_paired_grid.json                # the default grid, every schedule: about 20 minutes

Every QuickMerge++ row (constant r; with ``--schedules``, the per-block entropy schedule and the per-image
budgets calibrated at that r's cost, as ``quickmerge eval vision`` builds them) minus ToMe-style at the same r,
and every row minus the unpatched model, per image, with 95% bootstrap intervals (points). Accuracy only: the
rows' speeds are in the eval's own JSON.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.stats import bootstrap_difference
from quickmerge.eval.vision_cli import SCHEDULES, build_sweep, calibrate, calibrate_image_budgets
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.image_budget import ImageBudget, bucketed_forward
from quickmerge.vision.train import correct_per_image


def points(values: list[float], base: list[float]) -> list[float]:
    return [round(100 * v, 3) for v in bootstrap_difference(values, base)]


def hits(model, images, labels, method: str, r, settings: dict, batch_size: int = 500) -> list[float]:
    """Per-image top-1 hits (1.0 / 0.0) of one sweep setting, per-image budgets run bucketed."""
    options = {k: v for k, v in settings.items() if k not in ("label", "image_budget")}
    with patch(model, r=r, method=method, **options) as handle:
        if "image_budget" not in settings:
            return correct_per_image(model, images, labels).float().tolist()
        budget = ImageBudget(**settings["image_budget"])
        out = []
        for i in range(0, len(images), batch_size):
            logits, _ = bucketed_forward(model, handle, normalize(images[i : i + batch_size]), budget)
            out.append((logits.argmax(-1) == labels[i : i + batch_size]).float())
        return torch.cat(out).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, nargs="+", default=[56, 64], help="tokens merged per block")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=["constant"],
                        help="QuickMerge++ rows besides constant r (ToMe-style always runs at constant r)")
    parser.add_argument("--out", default="results/vision_paired_r56_r64.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    images, labels = load_fashion_mnist("test")
    schedules = sorted(set(args.schedules) | {"constant"}, key=SCHEDULES.index)
    perplexity = calibrate(model) if "entropy" in schedules else None
    budgets = calibrate_image_budgets(model, args.r) if "per-image" in schedules else None
    sweep = build_sweep(["quickmerge", "tome"], args.r, schedules, perplexity,
                        num_tokens=model.patch_embed.num_patches, image_budgets=budgets)
    out: dict = {}
    with torch.inference_mode():
        base = correct_per_image(model, images, labels).float().tolist()
        rows = {}
        for (method, r, settings), r_cost in zip(sweep, [r for _ in range(len(sweep) // len(args.r))
                                                         for r in args.r], strict=True):
            rows[(settings.get("label", method), r_cost)] = hits(model, images, labels, method, r, settings)
            print(settings.get("label", method), r_cost, sum(rows[(settings.get("label", method), r_cost)]) /
                  len(base), flush=True)
        for r in args.r:
            tome = rows[("tome", r)]
            entry = {"unpatched": sum(base) / len(base)}
            for (label, r_cost), h in rows.items():
                if r_cost != r:
                    continue
                entry[label] = sum(h) / len(h)
                entry[f"{label}_minus_unpatched_pt"] = points(h, base)
                if label != "tome":
                    entry[f"{label}_minus_tome_pt"] = points(h, tome)
            out[r] = entry
            print(r, entry, flush=True)
    command = " ".join(["python", "benchmarks/exploration/vision_paired_r64.py", *sys.argv[1:]])
    result = {"command": command, "images": len(base), "by_r": out}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
