"""Entropy schedules past ToMe's cap: do they beat constant r where merging costs accuracy? (held-out only)

    python benchmarks/exploration/vision_high_compression.py [--r 32 48 64 80] [--out results/vision_high.json]

On the shipped ViT every schedule within ToMe's cap (a block merges at most half its tokens) stays
within ~0.2 pt of the unpatched model, so no schedule can be measurably better there. QuickMerge++'s
greedy matching has no cap: this compares, at the same cost (token-blocks, as
:func:`quickmerge.vision.budget.schedule_cost` counts them), a constant r per block (down to a floor
of 8 tokens) with the entropy schedule, both greedy, and the bipartite schedules where they reach.
Held-out training images 512..4999 (the first 512 calibrate the schedule, as ``eval vision`` does),
or with ``--split test`` the 10,000 test images; every image's hit is kept, and each entropy row is
compared with the constant row of its r, paired.
"""

import argparse
import copy
import json
import sys
import time

import torch

from quickmerge.data.fashion_mnist import normalize
from quickmerge.eval.stats import bootstrap_difference
from quickmerge.eval.vision import evaluate_setting
from quickmerge.eval.vision_cli import calibrate
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.budget import entropy_schedule, schedule_cost, token_counts
from quickmerge.vision.train import split_train_heldout


@torch.inference_mode()
def hits(model, images, labels, batch_size=500, **settings):
    """``[N]`` bool, each image classified right, and the mean tokens entering a block."""
    out, tokens = [], 0.0
    with patch(model, **settings) as handle:
        for i in range(0, len(images), batch_size):
            out.append(model(images[i : i + batch_size]).argmax(-1) == labels[i : i + batch_size])
            tokens += handle.mean_tokens * len(out[-1])
    return torch.cat(out), tokens / len(images)


def evaluation_images(split):
    """``(raw uint8 images, labels)``: held-out training images 512..4999 (the first 512 calibrate) or the test set."""
    if split == "test":
        from quickmerge.data.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist("test")
    _, (raw, labels) = split_train_heldout()
    return raw[512:], labels[512:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[32, 48, 64, 80])
    ap.add_argument("--only", choices=["greedy", "all"], default="all", help="greedy: the two greedy rows only")
    ap.add_argument("--split", choices=["heldout", "test"], default="heldout",
                    help="test: all 10,000 test images, for a check fixed after the held-out runs")
    ap.add_argument("--timed", type=int, default=0, metavar="ROUNDS",
                    help="also run each r's greedy rows and random / pool at the constant schedule, and ToMe-style "
                         "at its fastest (r = 98), through eval vision's harness: accuracy and speed-up against the "
                         "unpatched model timed alternately, ROUNDS rounds on a batch of 256")
    ap.add_argument("--out", default="results/vision_high.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    raw, labels = evaluation_images(args.split)
    images = normalize(raw)
    reference = copy.deepcopy(model).eval()

    def timed(name, method, r, **settings):
        row = evaluate_setting(model, reference, raw, labels, method=method, r=r, batch_size=256,
                               timing_rounds=args.timed, settings={"label": name, **settings})
        row = {"setting": f"timed {name}", **{k: v for k, v in row.items() if k != "method"}}
        print(row, flush=True)
        return row
    layers, n = len(model.blocks), model.patch_embed.num_patches
    perplexity = calibrate(model)
    base, _ = hits(model, images, labels, r=0)
    rows = [{"setting": "none", "accuracy": base.float().mean().item(), "mean_tokens": n + 1.0}]
    print(rows[0], flush=True)
    for r in args.r:
        counts = token_counts(n, [r] * layers, bipartite=False)  # constant r, down to the floor of 8 tokens
        settings = {
            "greedy-constant": dict(matching="greedy", r=[counts[i] - counts[i + 1] for i in range(layers)]),
            "greedy-entropy": dict(matching="greedy", r=entropy_schedule(perplexity, n, r, bipartite=False)),
            "bipartite-constant": dict(r=r),
            "bipartite-entropy": dict(r=entropy_schedule(perplexity, n, r)),
            "tome": dict(method="tome", r=r),
        }
        if args.only == "greedy":
            settings = {k: v for k, v in settings.items() if k.startswith("greedy")}
        kept = {}
        for name, s in settings.items():
            start = time.perf_counter()
            hit, tokens = hits(model, images, labels, **s)
            kept[name] = hit
            schedule = s["r"] if isinstance(s["r"], list) else None
            row = {"setting": name, "r": r, "schedule": schedule, "accuracy": hit.float().mean().item(),
                   "mean_tokens": tokens, "seconds": round(time.perf_counter() - start, 1)}
            if schedule is not None:
                row["cost"] = schedule_cost(token_counts(n, [float(x) for x in schedule], 1, bipartite=False))
            rows.append(row)
            print(row, flush=True)
        pairs = (("greedy-entropy", "greedy-constant"), ("bipartite-entropy", "bipartite-constant"))
        for entropy, constant in pairs[: 1 if args.only == "greedy" else 2]:
            mean, low, high = bootstrap_difference(kept[entropy].float().tolist(), kept[constant].float().tolist())
            rows.append({"setting": f"{entropy} - {constant}", "r": r, "difference": mean, "ci95": [low, high]})
            print(rows[-1], flush=True)
        if args.timed:
            for name in ("greedy-constant", "greedy-entropy"):
                rows.append(timed(name, "quickmerge", settings[name]["r"], matching="greedy"))
            for method in ("random", "pool"):
                rows.append(timed(f"{method}-constant", method, settings["greedy-constant"]["r"]))
    if args.timed:
        rows.append(timed("tome", "tome", n // 2))  # every block halves its tokens: the fastest ToMe-style runs
    with open(args.out, "w") as f:
        json.dump({"split": args.split, "images": len(images), "command": " ".join(sys.argv),
                   "block_attention_perplexity": perplexity, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
