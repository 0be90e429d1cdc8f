"""Past ToMe's cap, is the entropy schedule better than a ToMe-style inflected schedule of the same cost? (held out)

    PYTHONPATH=. python benchmarks/exploration/vision_high_inflected.py [--r 96 112 128] [--inflect -0.5 -1.0]

ToMe's ``(r, inflect)`` schedule merges more in early blocks (inflect < 0), a fixed shape where the entropy
schedule takes its shape from the blocks' attention. Greedy matching, down to a floor of 8 tokens, each
inflected schedule the first (smallest r) whose cost in token-blocks is at most constant r's. Held-out training
images 512..4999; paired bootstrap against the entropy schedule of the same cost.
"""

import argparse
import json
import sys

import torch

from benchmarks.exploration.vision_high_compression import hits
from quickmerge.data.fashion_mnist import normalize
from quickmerge.eval.stats import bootstrap_difference
from quickmerge.eval.vision_cli import calibrate
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision.budget import entropy_schedule, schedule_cost, token_counts
from quickmerge.vision.schedule import inflected_schedule
from quickmerge.vision.train import split_train_heldout


def merged(counts):
    return [counts[i] - counts[i + 1] for i in range(len(counts) - 1)]


def inflected_at_cost(n, layers, r, inflect):
    """The inflected schedule, run down to the floor, of the smallest r' whose cost is at most constant r's."""
    budget = schedule_cost(token_counts(n, [float(r)] * layers, bipartite=False))
    for x in range(1, n + 1):
        counts = token_counts(n, [float(m) for m in inflected_schedule(layers, x, inflect)], bipartite=False)
        if schedule_cost(counts) <= budget:
            return merged(counts)
    raise ValueError("no inflected schedule is that cheap")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[96, 112, 128])
    ap.add_argument("--inflect", type=float, nargs="+", default=[-0.5, -1.0])
    ap.add_argument("--out", default="results/vision_high_inflected.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    _, (raw, labels) = split_train_heldout()
    images, labels = normalize(raw[512:]), labels[512:]
    layers, n = len(model.blocks), model.patch_embed.num_patches
    perplexity = calibrate(model)
    rows = []
    for r in args.r:
        schedules = {"greedy-entropy": entropy_schedule(perplexity, n, r, bipartite=False)}
        schedules |= {f"greedy-inflected{x:+.1f}": inflected_at_cost(n, layers, r, x) for x in args.inflect}
        kept = {}
        for name, schedule in schedules.items():
            hit, tokens = hits(model, images, labels, matching="greedy", r=schedule)
            kept[name] = hit
            cost = schedule_cost(token_counts(n, [float(m) for m in schedule], bipartite=False))
            rows.append({"setting": name, "r": r, "schedule": schedule, "cost": cost,
                         "accuracy": hit.float().mean().item(), "mean_tokens": tokens})
            print(rows[-1], flush=True)
        for name in list(schedules)[1:]:
            mean, low, high = bootstrap_difference(kept["greedy-entropy"].float().tolist(), kept[name].float().tolist())
            rows.append({"setting": f"greedy-entropy - {name}", "r": r, "difference": mean, "ci95": [low, high]})
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"split": "heldout", "images": len(images), "command": " ".join(sys.argv),
                   "block_attention_perplexity": perplexity, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
