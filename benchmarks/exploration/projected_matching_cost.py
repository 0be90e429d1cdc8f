"""Exploration (stop 83): what one bipartite round costs at the reference ViT's first block (batch 256, 196 patch
tokens, width 128, 4 heads x 32), r = 48, 2 threads: QuickMerge++'s default (the 128-wide residual stream, scaled
rule), the same after a 128 -> 32 projection (the projection's matmul included), ToMe-style (keys: the contiguous copy
of the qkv view and the mean over heads included). Medians of interleaved repeats.

    python benchmarks/exploration/projected_matching_cost.py --json results/s83/projected_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from quickmerge.baselines.tome import bipartite_round


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, n, c, h, r = 256, 196, 128, 4, 48
    x = torch.randn(b, n, c)
    qkv = torch.randn(b, n + 1, 3, h, c // h)
    keys = qkv.permute(2, 0, 3, 1, 4)[1]  # [B, H, N, hd], a strided view as timm's attention makes it
    cost = torch.rand(b, n) * 0.125
    basis = torch.linalg.qr(torch.randn(c, 32)).Q
    cases = {
        "hidden128_scaled": lambda: bipartite_round(x, r, cost_scale=cost),
        "projected32_scaled": lambda: bipartite_round(x @ basis, r, cost_scale=cost),
        "tome_keys": lambda: bipartite_round(keys.contiguous().mean(dim=1)[:, 1:], r),
        "hidden128_plain": lambda: bipartite_round(x, r),
        "projected32_plain": lambda: bipartite_round(x @ basis, r),
    }
    times = {k: [] for k in cases}
    for _ in range(3):
        for f in cases.values():
            f()
    for _ in range(args.repeats):
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    out = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(json.dumps(out, indent=1))
    with open(args.json, "w") as fh:
        json.dump({"command": "benchmarks/exploration/projected_matching_cost.py", "args": vars(args),
                   "median_ms": out, "torch": torch.__version__}, fh, indent=1)


if __name__ == "__main__":
    main()
