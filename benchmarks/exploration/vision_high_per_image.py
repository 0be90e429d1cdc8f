"""Per-image budgets past ToMe's cap: do they add to the entropy schedule where merging costs accuracy?

    PYTHONPATH=. python benchmarks/exploration/vision_high_per_image.py [--r 64 80 96 112] [--split heldout|test]

Greedy matching, every setting at the cost (token-blocks) of a constant r run down to a floor of 8
tokens: constant r, the per-block entropy schedule, per-image budgets (4 buckets by content
perplexity, each a constant r down to the floor) and both at once (each bucket runs the entropy
schedule of its r). Held-out training images 512..4999 (the first 512 calibrate, as ``eval vision``
does) or the 10,000 test images; paired bootstrap against constant r and against the entropy schedule.
"""

import argparse
import json
import sys
import time

import torch

from benchmarks.exploration.vision_high_compression import evaluation_images, hits
from quickmerge.data.fashion_mnist import normalize
from quickmerge.eval.stats import bootstrap_difference
from quickmerge.eval.vision_cli import calibrate, calibration_images
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.budget import entropy_schedule, schedule_cost, token_counts
from quickmerge.vision.image_budget import ImageBudget, bucketed_forward


@torch.inference_mode()
def bucketed_hits(model, images, labels, budget, batch_size=500):
    """``[N]`` bool and mean tokens entering a block, each image at its bucket's schedule."""
    out, tokens = [], 0.0
    with patch(model, matching="greedy") as handle:
        for i in range(0, len(images), batch_size):
            logits, mean_tokens = bucketed_forward(model, handle, images[i : i + batch_size], budget)
            out.append(logits.argmax(-1) == labels[i : i + batch_size])
            tokens += mean_tokens * len(out[-1])
    return torch.cat(out), tokens / len(images)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[64, 80, 96, 112])
    ap.add_argument("--split", choices=["heldout", "test"], default="heldout")
    ap.add_argument("--out", default="results/vision_high_per_image.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    raw, labels = evaluation_images(args.split)
    images = normalize(raw)
    layers, n = len(model.blocks), model.patch_embed.num_patches
    perplexity = calibrate(model)
    calib = calibration_images()
    rows = []
    for r in args.r:
        counts = token_counts(n, [r] * layers, bipartite=False)
        kept = {}
        common = dict(patch_size=2, num_tokens=n, num_layers=layers, r=r, bipartite=False)
        budgets = {"greedy-per-image": ImageBudget.calibrate(calib, **common),
                   "greedy-per-image-entropy": ImageBudget.calibrate(calib, **common, perplexity=perplexity)}
        for name in ("greedy-constant", "greedy-entropy", *budgets):
            start = time.perf_counter()
            if name in budgets:
                hit, tokens = bucketed_hits(model, images, labels, budgets[name])
                schedule = budgets[name].to_dict()
            else:
                sched = ([counts[i] - counts[i + 1] for i in range(layers)] if name == "greedy-constant"
                         else entropy_schedule(perplexity, n, r, bipartite=False))
                hit, tokens = hits(model, images, labels, matching="greedy", r=sched)
                schedule = sched
            kept[name] = hit
            row = {"setting": name, "r": r, "schedule": schedule, "accuracy": hit.float().mean().item(),
                   "mean_tokens": tokens, "seconds": round(time.perf_counter() - start, 1)}
            if name not in budgets:
                row["cost"] = schedule_cost(token_counts(n, [float(x) for x in sched], 1, bipartite=False))
            rows.append(row)
            print(row, flush=True)
        for ours in budgets:
            for other in ("greedy-constant", "greedy-entropy"):
                mean, low, high = bootstrap_difference(kept[ours].float().tolist(), kept[other].float().tolist())
                rows.append({"setting": f"{ours} - {other}", "r": r, "difference": mean, "ci95": [low, high]})
                print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"split": args.split, "images": len(images), "command": " ".join(sys.argv),
                   "block_attention_perplexity": perplexity, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
