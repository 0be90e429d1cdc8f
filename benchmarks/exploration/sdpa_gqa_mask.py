"""Why proportional attention keeps SDPA's grouped-query path: one decode-step attention call, timed.

Usage: python benchmarks/exploration/sdpa_gqa_mask.py [--entries 4064] [--calls 200]

SmolLM2's shape (9 query heads, 3 KV heads, head dim 64), one query, 1 thread: no mask, a float mask with
``enable_gqa=True`` (quickmerge_sdpa on the CPU), and a float mask after repeating the KV heads (what
transformers' sdpa path does whenever a mask is given). Milliseconds per call, and the largest difference
between the two masked outputs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from quickmerge.eval.timing import per_call_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=4064)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, 1, 64, generator=gen)
    k, v = torch.randn(2, 1, 3, args.entries, 64, generator=gen)
    mask = torch.randn(1, 9, 1, args.entries, generator=gen)
    grouped = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    repeated = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    runs = {
        "no mask, GQA": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "float mask, GQA": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "float mask, repeated": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask),
    }
    for name, fn in runs.items():
        print(f"{name:22s} {per_call_ms(fn, args.calls):.2f} ms")
    print(f"max |grouped - repeated| = {(grouped - repeated).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
