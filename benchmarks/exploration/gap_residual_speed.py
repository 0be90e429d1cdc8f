"""Speed of an average-pooled classifier's forward under the residual unmerge against copying, and a check that the
patched model's own forward gives the logits ``gap_residual_unmerge.py`` measured (its feature-map reading).

    python benchmarks/exploration/gap_residual_speed.py --out results/gap_residual_speed.json

The average-pooled reference ViT of ``vision_gap_pooling.py`` (``results/vision_gap_vit.pt``), the first
``--images`` test images in batches of 500, ``--rounds`` rounds, each timing the unpatched model and, at every
``--r``, both unmerges (ToMe-style and QuickMerge++), the order rotating per round; images/s of ``model(x)``.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from gap_residual_unmerge import load_gap_vit, pooled_logits

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.vision import patch

BATCH = 500


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--r", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weights", default="results/vision_gap_vit.pt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_gap_vit(args.weights)
    batches = [normalize(b) for b in load_fashion_mnist("test")[0][:args.images].split(BATCH)]
    settings = [None] + [dict(r=r, method=m, unmerge=u) for r in args.r for m in ("tome", "quickmerge")
                         for u in ("residual", "copy")]
    check = {}
    with torch.inference_mode(), patch(model, r=args.r[0]) as handle:  # the forward against the script's reading
        for unmerge in ("residual", "copy"):
            handle.unmerge = unmerge
            check[unmerge] = float((model(batches[0]) - pooled_logits(model, batches[0])).abs().max())
    seconds = [0.0] * len(settings)
    for k in range(args.rounds):
        for j in range(len(settings)):
            i = (j + k) % len(settings)
            handle = None if settings[i] is None else patch(model, **settings[i])
            with torch.inference_mode():
                began = time.perf_counter()
                for x in batches:
                    model(x)
                seconds[i] += time.perf_counter() - began
            if handle is not None:
                handle.remove()
        print(f"round {k + 1}/{args.rounds}", flush=True)
    speed = [args.rounds * args.images / s for s in seconds]
    rows = [{**s, "images_per_s": v, "speedup": v / speed[0]} for s, v in zip(settings[1:], speed[1:], strict=True)]
    for a, b in zip(rows[::2], rows[1::2], strict=True):
        a["residual_over_copy"] = a["images_per_s"] / b["images_per_s"]
    result = {"command": " ".join(["python", "benchmarks/exploration/gap_residual_speed.py", *sys.argv[1:]]),
              "machine": f"{args.threads} CPU threads", "unpatched_images_per_s": speed[0],
              "forward_vs_feature_map_reading_max_abs_logit_difference": check, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
