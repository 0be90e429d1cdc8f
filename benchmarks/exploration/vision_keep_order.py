"""Tokens in patch order inside the blocks (``patch(keep_order=True)``) against the shipped shuffled order, on the
reference ViT: top-1 with and without it, paired, per method and r (stop 66, plan amendment 1).

    PYTHONPATH=. python benchmarks/exploration/vision_keep_order.py --out results/s66/vision_keep_order.json

Held-out training images 512..4999 only (the first 512 calibrate ``eval vision``; nothing here calibrates).
Bipartite matching (ToMe-style and QuickMerge++'s default) shuffles the tokens each block (one alternate set's kept
tokens, then the other set); greedy matching keeps them nearly in order, so its rows check that the relabelling
changes little there.
"""

import argparse
import json
import time

import torch

from benchmarks.exploration.vision_high_compression import evaluation_images, hits
from quickmerge.data.fashion_mnist import normalize
from quickmerge.eval.stats import bootstrap_difference
from quickmerge.pretrained.fashion_vit import load_fashion_vit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[16, 32, 48, 64, 80, 98])
    ap.add_argument("--greedy-r", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--out", default="results/vision_keep_order.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    raw, labels = evaluation_images("heldout")
    images = normalize(raw)
    settings = [(method, {"method": method}, r) for r in args.r for method in ("tome", "quickmerge")]
    settings += [("quickmerge greedy", {"matching": "greedy"}, r) for r in args.greedy_r]
    none, _ = hits(model, images, labels, r=0)
    rows = [{"setting": "none", "accuracy": none.float().mean().item()}]
    print(rows[-1], flush=True)
    for label, options, r in settings:
        kept = {}
        for keep_order in (False, True):
            start = time.perf_counter()
            kept[keep_order], tokens = hits(model, images, labels, r=r, keep_order=keep_order, **options)
            rows.append({"setting": label, "r": r, "keep_order": keep_order,
                         "accuracy": kept[keep_order].float().mean().item(), "mean_tokens": tokens,
                         "seconds": round(time.perf_counter() - start, 1)})
            print(rows[-1], flush=True)
        mean, low, high = bootstrap_difference(kept[True].float().tolist(), kept[False].float().tolist())
        rows.append({"setting": f"{label}: in order - shuffled", "r": r, "difference": mean, "ci95": [low, high],
                     "images_changing_verdict": int((kept[True] != kept[False]).sum())})
        print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"split": "heldout", "images": len(labels),
                   "command": "benchmarks/exploration/vision_keep_order.py " + " ".join(
                       f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                       for k, v in vars(args).items()),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
