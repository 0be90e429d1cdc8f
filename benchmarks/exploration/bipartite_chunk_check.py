"""Would bipartite matching gain from greedy matching's chunks of images? (stop 50: not adopted at 196 tokens;
stop 73: adopted where it pays, ``quickmerge.baselines.tome.images_per_chunk``; the "rule" column)

    python benchmarks/exploration/bipartite_chunk_check.py [--tokens 196] [--rounds 15] [--threads 2] [--out F.json]

Times ``bipartite_round`` (ToMe-style's matching and QuickMerge++'s) on random states of the reference ViT's shape
(batch 256, ``--tokens`` tokens, r = 16) on the whole batch and in chunks of 109 / 47 / 22 images (109: greedy
matching's rule, 2^20 pairs of the ``[b, n/2, n/2]`` scores; 47 and 22 also count the normalised states) and of
the size ``bipartite_round`` now picks by itself on a CPU (the "rule" column), for keys (32 wide) and hidden states
(128 wide), plain (ToMe-style), additive and scaled, alternating, medians; checks each chunked result equals the
whole batch's; and times one block of the shipped ViT on the same batch (``--tokens`` + 1 with the class token), so
the saving reads as a share of a block. Each explicit chunk runs as one pass.
"""

import argparse
import json
import statistics
import time

import torch

from quickmerge.baselines import tome
from quickmerge.pretrained.fashion_vit import load_fashion_vit

STEPS = (256, 109, 47, 22)
BATCH = 256


def chunked(metric: torch.Tensor, r: int, step: int, penalty: torch.Tensor | None = None,
            cost_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``bipartite_round`` on chunks of ``step`` images, each in one pass (its own split bypassed)."""
    def part(v: torch.Tensor | None, i: int) -> torch.Tensor | None:
        return None if v is None else v[i : i + step]

    return torch.cat([tome._bipartite_round(metric[i : i + step], r, False, part(penalty, i), part(cost_scale, i), None)
                      for i in range(0, len(metric), step)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=196)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.tokens
    saliency = torch.rand(BATCH, n, generator=g).softmax(-1)
    rules = {"plain": {}, "additive": {"penalty": 0.5 * saliency.argsort(-1).argsort(-1).float() / (n - 1)},
             "scaled": {"cost_scale": 0.125 * n * saliency}}
    budget = tome._ELEMENTS_PER_CHUNK
    results = []
    for width in (32, 128):
        metric = torch.randn(BATCH, n, width, generator=g)
        for rule, extra in rules.items():
            steps = {**{s: s for s in STEPS}, "rule": tome.images_per_chunk(BATCH, n, width, rule == "scaled")}
            whole = chunked(metric, 16, BATCH, **extra)
            same = all(torch.equal(chunked(metric, 16, s, **extra), whole) for s in steps.values()) \
                and torch.equal(tome.bipartite_round(metric, 16, **extra), whole)  # as the library splits it
            times = {s: [] for s in steps}
            for _ in range(args.rounds):
                for key, s in steps.items():
                    t = time.perf_counter()
                    chunked(metric, 16, s, **extra)
                    times[key].append(time.perf_counter() - t)
            ms = {s: 1e3 * statistics.median(v) for s, v in times.items()}
            results.append({"width": width, "rule": rule, "identical": same, "ms": ms, "rule_step": steps["rule"]})
            print(width, rule, same, "  ".join(f"{s}: {v:.2f} ms" for s, v in ms.items()), flush=True)
    model = load_fashion_vit().eval()
    x = torch.randn(BATCH, n + 1, model.embed_dim, generator=g)
    with torch.inference_mode():
        block = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            model.blocks[0](x)
            block.append(time.perf_counter() - t)
    block_ms = 1e3 * statistics.median(block)
    print(f"one block, batch {BATCH}, {n + 1} tokens: {block_ms:.1f} ms")
    best = [{**row, "best_saving_ms": row["ms"][BATCH] - min(row["ms"].values()),
             "saving_share_of_block": (row["ms"][BATCH] - min(row["ms"].values())) / block_ms,
             "rule_saving_ms": row["ms"][BATCH] - row["ms"]["rule"],
             "rule_saving_share_of_block": (row["ms"][BATCH] - row["ms"]["rule"]) / block_ms} for row in results]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": best, "block_ms": block_ms, "tokens": n, "batch": BATCH, "budget": budget,
                       "threads": args.threads, "rounds": args.rounds,
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
