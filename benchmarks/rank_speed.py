"""Ranks within rows: one sort + scatter (``quickmerge.primitives.rank01``) vs the double argsort it replaced.

Both timed alternately in one process on the same scores (saliency ranks of a ViT batch: ``[256, 196]``).

    python benchmarks/rank_speed.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from quickmerge.primitives import rank01


def double_argsort(scores: torch.Tensor) -> torch.Tensor:
    return scores.argsort(dim=-1).argsort(dim=-1).to(torch.float32) / max(scores.shape[-1] - 1, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=2, default=[256, 196])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scores = torch.randn(*args.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rank01(scores), double_argsort(scores))
    times: dict[str, list[float]] = {"rank01 (sort + scatter)": [], "double argsort": []}
    for _ in range(args.repeats):
        for name, fn in (("rank01 (sort + scatter)", rank01), ("double argsort", double_argsort)):
            start = time.perf_counter()
            fn(scores)
            times[name].append(time.perf_counter() - start)
    medians = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name:24s} {ms:.3f} ms")
    print(f"speed-up {medians['double argsort'] / medians['rank01 (sort + scatter)']:.2f}x "
          f"(shape {args.shape}, {args.threads} thread(s), torch {torch.__version__})")


if __name__ == "__main__":
    main()
