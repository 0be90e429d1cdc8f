"""The saliency with one exponential per logit (stop 74) against stop 73's log-softmax form, timed alternately.

    python benchmarks/exploration/saliency_one_exp.py --json docs/results/stop74/saliency_one_exp.json

Stop 73's ``attention_saliency`` took a log-softmax, its exponential, and ``weight * p`` as a full tensor; stop 74's
takes one exponential of the shifted logits, the entropy as ``log Z - p . logits`` and the received attention as a
matrix product. Both here run in the library's CPU chunks (``_LOGITS_PER_CHUNK``). Random queries and keys (speed
does not depend on them) at the shapes that use the saliency: the small VideoMAE of ``video_vit_fashion.py`` (batch
256, 4 heads, 256 tokens, 16 spread queries, and its later blocks' 192 and 128 tokens), the reference ViT's class
token (batch 256, 4 heads, 197 tokens), a ViT-B-like batch (256, 12 heads, 197 tokens, 16 queries). Each round times
both forms once (``--reps`` calls each), the order alternating; milliseconds per call, medians, and the largest
difference between the two forms' outputs.
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

from quickmerge.primitives import attention_received, normalize_entropy
from quickmerge.vision import token_merge
from quickmerge.vision.token_merge import attention_saliency

# (batch, heads, tokens, head width, source)
SHAPES = ((256, 4, 256, 32, "queries"), (256, 4, 192, 32, "queries"), (256, 4, 128, 32, "queries"),
          (256, 4, 197, 32, "cls"), (256, 12, 197, 64, "queries"))


def stop73_saliency(q: torch.Tensor, k: torch.Tensor, scale: float, log_size: torch.Tensor, source: str,
                    num_queries: int = 16) -> torch.Tensor:
    """Stop 73's formula (no padding) in the library's CPU chunks: log-softmax, exp, ``weight * p`` summed."""
    b, h, n, _ = k.shape
    m = min(num_queries, n) if source == "queries" else 1
    step = max(1, token_merge._LOGITS_PER_CHUNK // (h * m * n))
    parts = []
    for i in range(0, b, step):
        qi, ki = q[i : i + step], k[i : i + step]
        qs = qi[:, :, :1] if source == "cls" else qi[:, :, torch.linspace(0, n - 1, m).long()]
        logits = torch.matmul(qs.float() * scale, ki.float().transpose(-1, -2))
        logits += log_size[i : i + step, None, None, :].float()
        log_p = logits.log_softmax(dim=-1)
        p = log_p.exp()
        weight = (1.0 - normalize_entropy(-torch.linalg.vecdot(p, log_p), n)).clamp_min(1e-6)  # stop 73's focus
        received = attention_received(p.flatten(1, 2), weight.flatten(1, 2))
        parts.append(received / weight.sum(dim=(1, 2))[:, None])
    return torch.cat(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for b, h, n, d, source in SHAPES:
        q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
        log_size = torch.rand(b, n).mul(3).add(1).floor().log()  # sizes 1-3
        forms = {"stop 73 (log-softmax)": lambda: stop73_saliency(q, k, d**-0.5, log_size, source),
                 "stop 74 (one exp)": lambda: attention_saliency(q, k, d**-0.5, log_size, source)}
        outputs = {name: fn() for name, fn in forms.items()}
        difference = (outputs["stop 73 (log-softmax)"] - outputs["stop 74 (one exp)"]).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in forms}
        for i in range(args.rounds):
            for name in list(forms)[:: 1 if i % 2 == 0 else -1]:
                start = time.perf_counter()
                for _ in range(args.reps):
                    forms[name]()
                times[name].append(1e3 * (time.perf_counter() - start) / args.reps)
        before, after = (statistics.median(t) for t in times.values())
        rows.append({"shape": [b, h, n, d], "source": source, "stop73_ms": before, "stop74_ms": after,
                     "speedup": before / after, "max_abs_difference": difference, "rounds_ms": times})
        print(f"[B, H, N, hd] = {[b, h, n, d]} {source:>7}: stop 73 {before:7.2f} ms, stop 74 {after:7.2f} ms, "
              f"{before / after:.2f}x; outputs differ by at most {difference:.1e}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "cores": os.cpu_count(), "torch": torch.__version__,
                                               "platform": platform.platform(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
