"""Throughput of the schedules past ToMe's cap, timed together: one patched copy per schedule, every round
times the unpatched model and each schedule once, in an order that rotates from round to round (medians).

    python benchmarks/exploration/vision_high_speed.py [--rounds 25] [--out results/vision_high_speed.json] \
        [--hidden-scaled] [--no-drop-pool]

``--hidden-scaled`` adds the greedy schedules with the chosen matching (``similarity="hidden",
saliency_rule="scaled"``) next to the keys + additive ones; ``--no-drop-pool`` leaves out random dropping
and pooling.

The schedules are those of ``vision_high_compression.py`` (its test-set run gives their accuracy); a run
of eval vision's harness times each setting against the unpatched model in its own few rounds, where this
machine's drift (the unpatched model at 140-190 images/s within one run) moved speed-ups of equal-cost
settings apart by up to 23%.
"""

import argparse
import copy
import json
import statistics
import sys
import time

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.vision_cli import calibrate
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.budget import entropy_schedule, token_counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[96, 112, 128])
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--out", default="results/vision_high_speed.json")
    ap.add_argument("--hidden-scaled", action="store_true", help="also the chosen matching (hidden + scaled)")
    ap.add_argument("--no-drop-pool", action="store_true", help="leave out random dropping and pooling")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    layers, n = len(model.blocks), model.patch_embed.num_patches
    perplexity = calibrate(model)
    schedules = {"unpatched": None, "tome r=98 (every block halves)": dict(method="tome", r=n // 2)}
    for r in args.r:
        counts = token_counts(n, [r] * layers, bipartite=False)
        constant = [counts[i] - counts[i + 1] for i in range(layers)]
        entropy = entropy_schedule(perplexity, n, r, bipartite=False)
        schedules[f"greedy constant r={r}"] = dict(matching="greedy", r=constant)
        schedules[f"greedy entropy r={r}"] = dict(matching="greedy", r=entropy)
        if args.hidden_scaled:
            chosen = dict(matching="greedy", similarity="hidden", saliency_rule="scaled")
            schedules[f"greedy constant r={r} hidden+scaled"] = dict(chosen, r=constant)
            schedules[f"greedy entropy r={r} hidden+scaled"] = dict(chosen, r=entropy)
        if not args.no_drop_pool:
            schedules[f"random constant r={r}"] = dict(method="random", r=constant)
            schedules[f"pool constant r={r}"] = dict(method="pool", r=constant)
    copies = {}
    for name, settings in schedules.items():
        copies[name] = copy.deepcopy(model).eval()
        if settings is not None:
            patch(copies[name], **settings)
    images, _ = load_fashion_mnist("test")
    batch = normalize(images[: args.batch])
    names = list(schedules)
    times = {name: [] for name in names}
    with torch.inference_mode():
        for name in names:  # warm-up
            copies[name](batch)
        for i in range(args.rounds):
            for name in names[i % len(names):] + names[: i % len(names)]:
                start = time.perf_counter()
                copies[name](batch)
                times[name].append(time.perf_counter() - start)
            print(f"round {i + 1}/{args.rounds}", flush=True)
    base = statistics.median(times["unpatched"])
    rows = [{"schedule": name, "r": None if schedules[name] is None else schedules[name]["r"],
             "median_s": statistics.median(times[name]), "speedup": base / statistics.median(times[name]),
             "images_per_s": args.batch / statistics.median(times[name])} for name in names]
    for row in rows:
        print(f"{row['schedule']:46s} {row['speedup']:.2f}x  {row['images_per_s']:.0f} images/s")
    with open(args.out, "w") as f:
        json.dump({"command": " ".join(sys.argv), "threads": 2, "batch": args.batch, "rounds": args.rounds,
                   "rows": rows, "times_s": times}, f, indent=2)


if __name__ == "__main__":
    main()
