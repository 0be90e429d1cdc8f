"""Would bipartite matching gain from greedy matching's chunks of images? (stop 50; not adopted)

    python benchmarks/exploration/bipartite_chunk_check.py [--rounds 15] [--threads 2] [--out F.json]

Times ``bipartite_round`` (ToMe-style's matching and QuickMerge++'s default) on the reference ViT's first block
(batch 256, 196 tokens, r = 16) on the whole batch and in chunks of 109 / 47 / 22 images (109: greedy matching's
rule, 2^20 pairs of the ``[b, n/2, n/2]`` scores; 47 and 22 also count the normalised states), for keys (32 wide)
and hidden states (128 wide), plain (ToMe-style), additive and scaled, alternating, medians; checks each chunked
result equals the whole batch's; and times one block of the shipped ViT on the same batch, so the saving reads as a
share of a block.
"""

import argparse
import json
import statistics
import time

import torch

from quickmerge.baselines.tome import bipartite_round
from quickmerge.pretrained.fashion_vit import load_fashion_vit

STEPS = (256, 109, 47, 22)


def chunked(metric: torch.Tensor, r: int, step: int, **extra: torch.Tensor) -> torch.Tensor:
    return torch.cat([bipartite_round(metric[i : i + step], r, **{k: v[i : i + step] for k, v in extra.items()})
                      for i in range(0, len(metric), step)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    saliency = torch.rand(256, 196, generator=g).softmax(-1)
    rules = {"plain": {}, "additive": {"penalty": 0.5 * saliency.argsort(-1).argsort(-1).float() / 195},
             "scaled": {"cost_scale": 0.125 * 196 * saliency}}
    results = []
    for width in (32, 128):
        metric = torch.randn(256, 196, width, generator=g)
        for rule, extra in rules.items():
            whole = chunked(metric, 16, 256, **extra)
            same = all(torch.equal(chunked(metric, 16, s, **extra), whole) for s in STEPS)
            times = {s: [] for s in STEPS}
            for _ in range(args.rounds):
                for s in STEPS:
                    t = time.perf_counter()
                    chunked(metric, 16, s, **extra)
                    times[s].append(time.perf_counter() - t)
            ms = {s: 1e3 * statistics.median(v) for s, v in times.items()}
            results.append({"width": width, "rule": rule, "identical": same, "ms": ms})
            print(width, rule, same, "  ".join(f"{s}: {v:.2f} ms" for s, v in ms.items()), flush=True)
    model = load_fashion_vit().eval()
    x = torch.randn(256, 197, model.embed_dim, generator=g)
    with torch.inference_mode():
        block = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            model.blocks[0](x)
            block.append(time.perf_counter() - t)
    block_ms = 1e3 * statistics.median(block)
    print(f"one block, batch 256, 197 tokens: {block_ms:.1f} ms")
    best = [{**row, "best_saving_ms": row["ms"][256] - min(row["ms"].values()),
             "saving_share_of_block": (row["ms"][256] - min(row["ms"].values())) / block_ms} for row in results]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": best, "block_ms": block_ms, "threads": args.threads, "rounds": args.rounds,
                       "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
