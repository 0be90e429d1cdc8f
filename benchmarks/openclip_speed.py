"""Throughput of OpenCLIP's ViT-B-16 image tower patched by quickmerge, against the unpatched tower.

    python benchmarks/openclip_speed.py [--r 8 16] [--batch 8] [--rounds 5] [--threads 2] [--json PATH] \
        [--full-projection]

The architecture of ``open_clip.create_model("ViT-B-16")`` with random weights (no pretrained weights can be
downloaded here, so this measures speed only, not accuracy): the unpatched tower and, for each r, QuickMerge++
and ToMe-style merging. Every setting is timed in the same rounds on the same batch of random 224x224 images,
the order rotating each round; medians and speed-ups against the unpatched tower timed in the same run. The
OpenCLIP adapter computes what the merge reads of queries and keys once more per block (``nn.MultiheadAttention``
does not expose them), which this includes; ``--full-projection`` also times each method with every query and key
projected, as the adapter did before stop 77 (settings ``quickmerge+all``, ``tome+all``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

from quickmerge.vision import patch, unpatch


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--full-projection", action="store_true")
    args = ap.parse_args()
    import open_clip

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16").eval()
    tower = model.visual
    images = torch.randn(args.batch, 3, 224, 224)
    methods = ("quickmerge", "tome") + (("quickmerge+all", "tome+all") if args.full_projection else ())
    settings = [("none", 0)] + [(m, r) for r in args.r for m in methods]

    def run(method: str, r: int) -> float:
        if method != "none":
            handle = patch(tower, r=r, method=method.removesuffix("+all"))
            if method.endswith("+all"):
                handle.attention_reads = lambda: "all"  # this instance projects every query and key
        try:
            tower(images)  # warm-up at these settings
            start = time.perf_counter()
            tower(images)
            return time.perf_counter() - start
        finally:
            if method != "none":
                unpatch(tower)

    times: dict[str, list[float]] = {f"{m}@{r}": [] for m, r in settings}
    for k in range(args.rounds):
        for method, r in settings[k % len(settings):] + settings[: k % len(settings)]:
            times[f"{method}@{r}"].append(run(method, r))
            print(f"round {k + 1}/{args.rounds} {method} r={r}: {times[f'{method}@{r}'][-1]:.3f} s", flush=True)
    base = statistics.median(times["none@0"])
    rows = [{"method": m, "r": r, "median_s": statistics.median(times[f"{m}@{r}"]),
             "images_per_s": args.batch / statistics.median(times[f"{m}@{r}"]),
             "speedup": base / statistics.median(times[f"{m}@{r}"])} for m, r in settings]
    for row in rows:
        print(f"{row['method']:>14} r={row['r']:>2}: {row['images_per_s']:.2f} img/s, {row['speedup']:.2f}x")
    if args.json:
        out = {"command": "python benchmarks/openclip_speed.py " + " ".join(sys.argv[1:]),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
               "torch": torch.__version__, "open_clip": getattr(open_clip, "__version__", "?"),
               "rows": rows, "times_s": times}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
