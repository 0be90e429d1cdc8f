"""Speed-ups of merging at several batch sizes on this CPU (images/s, alternating rounds, medians).

    python benchmarks/exploration/vision_batch_sizes.py [--batches 32 64 128 256] [--r 16 32 48] [--rounds 5]

The same 256 test images in every configuration (run as 256 / b batches of b), the shipped 90.85% ViT, 2 threads:
the unpatched model, QuickMerge++ and ToMe-style at each r. Writes docs/results/issue11/vision_batch_sizes.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--r", type=int, nargs="+", default=[16, 32, 48])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="docs/results/issue11/vision_batch_sizes.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    reference = copy.deepcopy(model)
    images = normalize(load_fashion_mnist("test")[0][:256])
    rows = []
    with torch.inference_mode(), patch(model, r=0) as handle:
        for b in args.batches:
            chunks = images.split(b)

            def run(m, chunks=chunks):
                for c in chunks:
                    m(c)

            parts = {"unpatched": lambda: run(reference)}
            for method in ("quickmerge", "tome"):
                for r in args.r:
                    def go(method=method, r=r):
                        handle.method, handle.r = method, r
                        run(model)
                    parts[f"{method}-{r}"] = go
            times = {k: [] for k in parts}
            for fn in parts.values():
                fn()  # warm-up
            for _ in range(args.rounds):
                for k, fn in parts.items():
                    t = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"batch": b, "unpatched_images_per_s": 256 / med["unpatched"],
                   "speedup": {k: med["unpatched"] / v for k, v in med.items() if k != "unpatched"}}
            rows.append(row)
            print(b, round(row["unpatched_images_per_s"]), {k: round(v, 2) for k, v in row["speedup"].items()},
                  flush=True)
    with open(args.json, "w") as f:
        json.dump({"rows": rows, "config": {**vars(args), "torch": torch.__version__,
                                            "platform": platform.platform()}}, f, indent=1)


if __name__ == "__main__":
    main()
