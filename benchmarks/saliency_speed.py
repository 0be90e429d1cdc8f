"""QuickMerge++'s attention saliency alone: stop 67's formula against today's, whole batch against CPU chunks.

    python benchmarks/saliency_speed.py --json docs/results/stop68/saliency_speed.json

Random queries and keys (speed does not depend on them) at three shapes: the small VideoMAE of
``video_vit_fashion.py`` (batch 256, 4 heads, 256 tokens, 16 spread queries), a ViT-B-like batch (256, 12 heads,
197 tokens) and VideoMAE-Base's clip (batch 1, 12 heads, 1,568 tokens). Milliseconds per call, median of the
rounds: stop 67's formula on the whole batch at once, against ``attention_saliency`` as it is (on a CPU, in chunks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from quickmerge.primitives import attention_received, focus
from quickmerge.vision.token_merge import attention_saliency

SHAPES = ((256, 4, 256, 32), (256, 12, 197, 64), (1, 12, 1568, 64))


def stop67_saliency(q: torch.Tensor, k: torch.Tensor, scale: float, log_size: torch.Tensor,
                    num_queries: int = 16) -> torch.Tensor:
    """The spread-query saliency as stop 67 computed it: softmax, ``xlogy`` entropy, one batch."""
    n = k.shape[2]
    qs = q[:, :, torch.linspace(0, n - 1, min(num_queries, n)).long()]
    logits = torch.matmul(qs.float(), k.float().transpose(-1, -2)) * scale + log_size[:, None, None, :]
    p = logits.softmax(dim=-1)
    weight = focus(p, n).clamp_min(1e-6)
    return attention_received(p.flatten(1, 2), weight.flatten(1, 2)) / weight.sum(dim=(1, 2))[:, None]


def per_call_ms(fn, rounds: int, reps: int) -> list[float]:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append(1e3 * (time.perf_counter() - start) / reps)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for b, h, n, d in SHAPES:
        q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
        log_size = torch.rand(b, n).mul(3).add(1).floor().log()  # sizes 1-3
        whole = attention_saliency(q, k, d**-0.5, log_size, "queries")
        assert torch.allclose(whole, stop67_saliency(q, k, d**-0.5, log_size), atol=1e-6)
        for name, fn in (("stop 67, whole batch", stop67_saliency), ("now (CPU chunks)", attention_saliency)):
            inputs = (q, k, d**-0.5, log_size) + (("queries",) if fn is attention_saliency else ())
            times = per_call_ms(lambda fn=fn, inputs=inputs: fn(*inputs), args.rounds, args.reps)
            rows.append({"shape": [b, h, n, d], "version": name, "ms": statistics.median(times), "rounds": times})
            print(f"[B, H, N, hd] = {[b, h, n, d]}: {name:>22} {rows[-1]['ms']:.2f} ms", flush=True)
        rows[-1]["speedup_over_stop67"] = rows[-2]["ms"] / rows[-1]["ms"]
        print(f"  {rows[-1]['speedup_over_stop67']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cores": os.cpu_count(), "torch": torch.__version__,
                                               "platform": platform.platform(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
