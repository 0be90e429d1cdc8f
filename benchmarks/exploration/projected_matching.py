"""Exploration (stop 83): QuickMerge++'s default matching compares the 128-wide residual stream; would a per-block
32- or 16-wide projection of it (top right singular vectors of the unmerged streams of calibration *training*
images) keep its accuracy at ToMe-style's matching cost?

    python benchmarks/exploration/projected_matching.py --r 48 64 --dims 32 16 --json results/s83/projected.json

Accuracy on the 10,000 test images, batch 256, for: QuickMerge++ as shipped, QuickMerge++ matching on the
projection (uncentred and centred SVD), ToMe-style. The projection is injected by wrapping the bipartite round that
``quickmerge.vision.token_merge`` calls (the n-th call of a forward is block n: every block merges at these r).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import quickmerge
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import token_merge

ORIGINAL = token_merge.bipartite_round


class Projector:
    """Wraps the bipartite round: records (``record``) or projects (``proj``) the metric of the n-th call."""

    def __init__(self) -> None:
        self.calls, self.record, self.proj, self.depth = 0, None, None, 6

    def __call__(self, metric, r, **kw):
        layer = self.calls % self.depth
        self.calls += 1
        if self.record is not None:
            self.record[layer].append(metric.reshape(-1, metric.shape[-1]).clone())
        if self.proj is not None:
            mean, basis = self.proj[layer]
            metric = (metric - mean) @ basis
        return ORIGINAL(metric, r, **kw)


@torch.inference_mode()
def accuracy(model, x, y, batch, **settings) -> float:
    hits = 0
    with quickmerge.patch(model, **settings):
        for i in range(0, len(x), batch):
            hits += (model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum().item()
    return hits / len(x)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[48, 64])
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 16])
    ap.add_argument("--calibration", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_fashion_vit().eval()
    xt, _ = load_fashion_mnist("train")
    x, y = load_fashion_mnist("test")
    x, calib = normalize(x), normalize(xt[-args.calibration:])  # the last training images (held out of nothing)
    wrap = Projector()
    token_merge.bipartite_round = wrap
    wrap.record = [[] for _ in range(wrap.depth)]
    with torch.inference_mode(), quickmerge.patch(model, r=1):
        for i in range(0, len(calib), args.batch):
            model(calib[i : i + args.batch])
    streams = [torch.cat(s) for s in wrap.record]
    wrap.record = None
    rows = []
    for r in args.r:
        for label, settings, proj in [("quickmerge", {"method": "quickmerge"}, None),
                                      ("tome", {"method": "tome"}, None)] + [
                (f"quickmerge-svd{d}-{kind}", {"method": "quickmerge"}, (d, kind))
                for d in args.dims for kind in ("uncentred", "centred")]:
            if proj is None:
                wrap.proj = None
            else:
                d, kind = proj
                wrap.proj = []
                for s in streams:
                    mean = s.mean(0) if kind == "centred" else torch.zeros(s.shape[1])
                    basis = torch.linalg.svd(s - mean, full_matrices=False).Vh[:d].T.contiguous()
                    wrap.proj.append((mean, basis))
            wrap.calls = 0
            start = time.perf_counter()
            acc = accuracy(model, x, y, args.batch, r=r, **settings)
            rows.append({"label": label, "r": r, "accuracy": acc, "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)
            with open(args.json, "w") as f:
                json.dump({"command": "benchmarks/exploration/projected_matching.py", "args": vars(args), "rows": rows},
                          f, indent=1)


if __name__ == "__main__":
    main()
