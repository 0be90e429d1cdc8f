"""Does restoring the norm mass of merged tokens help off the shelf? Held-out images only (never the test set).

    python benchmarks/exploration/vision_norm_restore.py [--r 16 32 48 64] [--out results/vision_norm_restore.json]

QuickMerge++'s fidelity constraint asks a merge to keep the input's norm mass; a plain weighted mean of
non-parallel tokens shrinks it. Here each merged group's mean is rescaled to the size-weighted mean norm of
its members ("mean", which keeps the norm mass exactly) or to their largest norm ("max", ToFu's MLERP), for
QuickMerge++ and ToMe-style alike, against the plain means. Top-1 on the last 5,000 training images (never
trained on), each row minus ToMe-style's plain row at the same r, paired 95% bootstrap intervals (points).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from quickmerge.eval.stats import bootstrap_difference
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.primitives import group_sum, weighted_mean
from quickmerge.vision import patch
from quickmerge.vision.train import correct_per_image, split_train_heldout

MODE = {"restore": None}


def restoring_mean(x, weight, assignment, k):
    mean, total = weighted_mean(x, weight, assignment, k)
    if MODE["restore"] is None:
        return mean, total
    keep = assignment >= 0
    norms = x.float().norm(dim=-1) * keep  # [B, n]
    idx = assignment.clamp_min(0)
    if MODE["restore"] == "mean":
        w = weight.float() * keep
        target = group_sum((norms * w)[..., None], idx, k)[..., 0] / total.float()
    else:  # max
        target = torch.zeros(x.shape[0], k, device=x.device).scatter_reduce(1, idx, norms, "amax")
    scale = target / mean.float().norm(dim=-1).clamp_min(1e-6)
    return (mean.float() * scale[..., None]).to(x.dtype), total


# the module, not the function of the same name that quickmerge.vision exports
sys.modules["quickmerge.vision.patch"].weighted_mean = restoring_mean


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[16, 32, 48, 64])
    ap.add_argument("--out", default="results/vision_norm_restore.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    _, (images, labels) = split_train_heldout()
    rows = []
    with torch.inference_mode():
        base = correct_per_image(model, images, labels).float().tolist()
        print("unpatched", sum(base) / len(base), flush=True)
        for r in args.r:
            hits = {}
            for method in ("tome", "quickmerge"):
                for restore in (None, "mean", "max"):
                    MODE["restore"] = restore
                    with patch(model, r=r, method=method):
                        hits[(method, restore)] = correct_per_image(model, images, labels).float().tolist()
                    MODE["restore"] = None
                    print(method, restore, r, sum(hits[(method, restore)]) / len(base), flush=True)
            ref = hits[("tome", None)]
            for (method, restore), h in hits.items():
                row = {"r": r, "method": method, "restore": restore, "accuracy": 100 * sum(h) / len(h),
                       "minus_tome_pt": [round(100 * v, 3) for v in bootstrap_difference(h, ref)],
                       "minus_unpatched_pt": [round(100 * v, 3) for v in bootstrap_difference(h, base)]}
                rows.append(row)
                print(row, flush=True)
    result = {"command": " ".join(["python", "benchmarks/exploration/vision_norm_restore.py", *sys.argv[1:]]),
              "images": len(base), "unpatched": 100 * sum(base) / len(base), "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
