"""Per-image budgets in one batch: bucketing by budget vs padding plus masks (issue 11, item 3).

Padding every image of a batch to the longest sequence and masking the padded keys computes,
in every block, as many tokens per image as the least-merged image keeps. A batch of 256 holds
images of every bucket (each bucket is a quarter of the images), so padded execution costs at
least a constant-r pass at the smallest bucket r. Its mask is free here: proportional attention
already adds ``log(size)`` to the logits, and a padded slot of size 0 gets ``-inf``. So the
constant-r pass at ``min(budget.r)`` is a lower bound on the time of any padded implementation,
and this script times it against the bucketed execution that ships, alternately on one batch:

    python benchmarks/vision_padding_bound.py [--r 16 24 32 40 48] [--rounds 5] [--threads 2] \
        [--json docs/results/issue11/vision_padding_bound.json]

Per r: the unpatched model, the bucketed per-image budget calibrated at r's cost (as
``quickmerge eval vision --schedules per-image`` runs it), QuickMerge++ at constant r on the
whole batch and on the buckets' sub-batches (what splitting the batch alone changes), and the
padding bound (QuickMerge++ at constant ``min(budget.r)``); medians, speed-ups against the
unpatched model timed in the same rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.vision_cli import calibrate_image_budgets
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.image_budget import ImageBudget, bucketed_forward


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, nargs="+", default=[16, 24, 32, 40, 48])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_fashion_vit()
    reference = copy.deepcopy(model)
    images, _ = load_fashion_mnist("test")
    batch = normalize(images[: args.batch])
    budgets = calibrate_image_budgets(model, args.r)
    rows = []
    with torch.inference_mode(), patch(model, r=0) as handle:
        for r in args.r:
            budget = ImageBudget(**budgets[r])
            r_min = min(budget.r)
            buckets = torch.bincount(budget.assign(batch), minlength=len(budget.r)).tolist()

            def constant(rr: int) -> Callable[[], float]:
                def run() -> float:
                    handle.r = rr
                    model(batch)
                    return handle.mean_tokens
                return run

            # the same sub-batches as the buckets, every one at the constant r: what sub-batching alone buys
            same_r = ImageBudget(budget.thresholds, [r] * len(budget.r), budget.patch_size)
            # r = 0 in every bucket: the unpatched computation (plus the hooks' bookkeeping, so if anything slower)
            no_merge = ImageBudget(budget.thresholds, [0] * len(budget.r), budget.patch_size)
            parts = {"unpatched": lambda: reference(batch),
                     "bucketed": lambda: bucketed_forward(model, handle, batch, budget)[1],  # noqa: B023
                     "constant_r": constant(r), "constant_r_in_bucket_sub_batches":
                         lambda: bucketed_forward(model, handle, batch, same_r)[1],  # noqa: B023
                     "unpatched_in_bucket_sub_batches": lambda: bucketed_forward(model, handle, batch, no_merge)[1],  # noqa: B023
                     "padding_bound": constant(r_min)}
            tokens = {k: fn() for k, fn in parts.items() if k != "unpatched"}
            times: dict[str, list[float]] = {k: [] for k in parts}
            for _ in range(args.rounds):
                for name, fn in parts.items():
                    times[name].append(_seconds(fn))
            median = {k: statistics.median(v) for k, v in times.items()}
            row = {"r": r, "bucket_r": budget.r, "images_per_bucket": buckets, "padding_r": r_min,
                   "mean_tokens": tokens, "seconds": median,
                   "speedup": {k: median["unpatched"] / median[k] for k in parts if k != "unpatched"}}
            rows.append(row)
            s = row["speedup"]
            print(f"r={r:>2} buckets r={budget.r} sizes={buckets}: bucketed {s['bucketed']:.2f}x "
                  f"({tokens['bucketed']:.0f} tokens/block), constant r {s['constant_r']:.2f}x "
                  f"({tokens['constant_r']:.0f}), constant r in the buckets' sub-batches "
                  f"{s['constant_r_in_bucket_sub_batches']:.2f}x (r = 0: {s['unpatched_in_bucket_sub_batches']:.2f}x), "
                  f"padding bound (r={r_min}) {s['padding_bound']:.2f}x "
                  f"({tokens['padding_bound']:.0f})", flush=True)
    result = {"rows": rows, "config": {**vars(args), "torch": torch.__version__, "platform": platform.platform(),
                                       "threads": torch.get_num_threads()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
