"""Choose QuickMerge++'s vision defaults on the 5,000 held-out training images (never the test set).

    python benchmarks/exploration/vision_tuning.py [--r 24 32] [--images 5000] [--grid 0|1|2|3] [--out ...]

Grid 0 is the first round (greedy matching, the default at the time), run before two mutually
nearest tokens were kept from both being removed: rerunning it now gives the greedy
rows with that rule. Grid 1 compares greedy and bipartite matching, grid 2 the last choices.
"""

import argparse
import json

import torch

from quickmerge.data.fashion_mnist import normalize
from quickmerge.vision import patch
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision.train import accuracy as unpatched_accuracy
from quickmerge.vision.train import split_train_heldout

GRID0 = [
    ("tome", {}),
    *[("quickmerge", {"saliency_weight": w, "matching": "greedy"}) for w in (0.0, 0.25, 0.5, 1.0)],
    ("quickmerge", {"saliency_weight": 0.5, "matching": "greedy", "saliency": "queries"}),
    ("quickmerge", {"saliency_weight": 0.5, "matching": "greedy", "epsilon": 0.5}),
    ("quickmerge", {"saliency_weight": 0.5, "matching": "greedy", "epsilon": 0.1}),
]
GRID = [
    ("tome", {}),
    ("quickmerge", {"saliency_weight": 0.0, "matching": "greedy"}),
    ("quickmerge", {"saliency_weight": 0.25, "matching": "greedy"}),
    ("quickmerge", {"saliency_weight": 0.1, "matching": "bipartite"}),
    ("quickmerge", {"saliency_weight": 0.25, "matching": "bipartite"}),
    ("quickmerge", {"saliency_weight": 0.5, "matching": "bipartite"}),
    ("quickmerge", {"saliency_weight": 1.0, "matching": "bipartite"}),
]
# second round, after the first picked bipartite matching with weight 0.5 (--grid 2)
GRID2 = [
    ("quickmerge", {"saliency_weight": 0.5, "matching": "bipartite", "saliency": "queries"}),
    ("quickmerge", {"saliency_weight": 0.75, "matching": "bipartite"}),
]
# third round (stop 31), on the 90.85% reference model: is the weight chosen on the 81% model still right?
GRID3 = [
    ("tome", {}),
    *[("quickmerge", {"saliency_weight": w, "matching": "bipartite"}) for w in (0.0, 0.1, 0.25, 0.5)],
]


@torch.inference_mode()
def accuracy(model, images, labels, **settings):
    with patch(model, **settings):
        return unpatched_accuracy(model, images, labels)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[24, 32])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--out", default="results/vision_tuning.json")
    ap.add_argument("--grid", type=int, default=1, choices=[0, 1, 2, 3])
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    _, (images, labels) = split_train_heldout()
    images, labels = images[: args.images], labels[: args.images]
    rows = [{"method": "none", "accuracy": accuracy(model, images, labels, r=0)}]
    print(rows[0])
    for r in args.r:
        for method, extra in (GRID0, GRID, GRID2, GRID3)[args.grid]:
            row = {"method": method, "r": r, **extra, "accuracy": accuracy(model, images, labels, r=r, method=method, **extra)}
            print(row, flush=True)
            rows.append(row)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
