"""Paired top-1 differences past the default grid (r = 56, 64) on all 10,000 test images, 90.85% model.

    python benchmarks/exploration/vision_paired_r64.py      # about 5 minutes on 2 cores

QuickMerge++ - ToMe-style, and each - unpatched, per image, with 95% bootstrap intervals (points).
"""

import json
from pathlib import Path

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist
from quickmerge.eval.stats import bootstrap_difference
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.train import correct_per_image


def points(values: list[float], base: list[float]) -> list[float]:
    return [round(100 * v, 3) for v in bootstrap_difference(values, base)]


def main() -> None:
    torch.set_num_threads(2)
    model = load_fashion_vit()
    images, labels = load_fashion_mnist("test")
    out = {}
    with torch.inference_mode():
        base = correct_per_image(model, images, labels).float().tolist()
        for r in (56, 64):
            hits = {}
            for method in ("quickmerge", "tome"):
                with patch(model, r=r, method=method):
                    hits[method] = correct_per_image(model, images, labels).float().tolist()
            out[r] = {"unpatched": sum(base) / len(base), **{m: sum(h) / len(h) for m, h in hits.items()},
                      "quickmerge_minus_tome_pt": points(hits["quickmerge"], hits["tome"]),
                      "quickmerge_minus_unpatched_pt": points(hits["quickmerge"], base),
                      "tome_minus_unpatched_pt": points(hits["tome"], base)}
            print(r, out[r], flush=True)
    result = {"command": "python benchmarks/exploration/vision_paired_r64.py", "images": len(base), "by_r": out}
    Path("results/vision_paired_r56_r64.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
