"""Saliency that protects tokens only where the class token's attention is focused. Held-out images only.

    python benchmarks/exploration/vision_focus_weight.py [--r 16 32 48 64] [--out results/vision_focus_weight.json]

QuickMerge++'s bipartite matching lowers each token's best-match score by ``saliency_weight * rank``: half the
tokens are protected by a quarter of the weight or more in every block, however diffuse the class token's
attention is there. Two entropy-aware alternatives, against ToMe-style and the default on the last 5,000
training images (never trained on), each minus ToMe-style at the same r with paired 95% intervals (points):

- ``focus``: the penalty scaled per image and block by the class token's focus (1 - H / log N, averaged over
  heads), so diffuse blocks match as ToMe does;
- ``excess``: the penalty ``w * clamp(n * s - 1, 0, 1)`` for saliency ``s`` over ``n`` tokens: only tokens
  receiving more than the uniform share of attention are protected, rank-free.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from quickmerge.baselines.tome import bipartite_round
from quickmerge.data.fashion_mnist import normalize
from quickmerge.eval.stats import bootstrap_difference
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.primitives import focus, rank01
from quickmerge.vision import patch
from quickmerge.vision.token_merge import attention_saliency
from quickmerge.vision.train import correct_per_image, split_train_heldout

MODE = {"variant": None, "focus": None}
module = sys.modules["quickmerge.vision.patch"]  # not the function quickmerge.vision exports under that name


def saliency_with_focus(q, k, scale, log_size, source="cls", num_queries=16):
    logits = torch.matmul(q[:, :, :1].float(), k.float().transpose(-1, -2)) * scale
    if log_size is not None:
        logits = logits + log_size[:, None, None, :].float()
    MODE["focus"] = focus(logits.softmax(-1), k.shape[2]).mean(dim=(1, 2))  # [B]
    return attention_saliency(q, k, scale, log_size, source, num_queries)


def assign(metric, saliency, r, saliency_weight):
    variant = MODE["variant"]
    if variant == "focus":
        penalty = saliency_weight * MODE["focus"][:, None] * rank01(saliency)
    elif variant == "excess":
        n = saliency.shape[1]
        penalty = saliency_weight * (n * saliency.float() / saliency.sum(-1, keepdim=True) - 1).clamp(0, 1)
    else:
        penalty = saliency_weight * rank01(saliency)
    return bipartite_round(metric, r, penalty=penalty)


module.attention_saliency = saliency_with_focus
module.quickmerge_bipartite_assign = assign

SETTINGS = [
    ("tome", None, {}),
    ("quickmerge", None, {}),
    ("quickmerge", "focus", {"saliency_weight": 0.5}),
    ("quickmerge", "focus", {"saliency_weight": 1.0}),
    ("quickmerge", "excess", {"saliency_weight": 0.5}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[16, 32, 48, 64])
    ap.add_argument("--out", default="results/vision_focus_weight.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    _, (images, labels) = split_train_heldout()
    rows, focus_by_layer = [], []
    with torch.inference_mode():
        base = correct_per_image(model, images, labels).float().tolist()
        for r in args.r:
            hits = {}
            for method, variant, extra in SETTINGS:
                MODE["variant"] = variant
                with patch(model, r=r, method=method, **extra):
                    hits[(method, variant, extra.get("saliency_weight"))] = \
                        correct_per_image(model, images, labels).float().tolist()
                h = hits[(method, variant, extra.get("saliency_weight"))]
                print(method, variant, extra, r, sum(h) / len(h), flush=True)
            ref = hits[("tome", None, None)]
            for (method, variant, weight), h in hits.items():
                rows.append({"r": r, "method": method, "variant": variant, "saliency_weight": weight,
                             "accuracy": 100 * sum(h) / len(h),
                             "minus_tome_pt": [round(100 * v, 3) for v in bootstrap_difference(h, ref)]})
        # the class token's focus per block, unpatched, on 500 of the images
        handle = patch(model, r=0)
        handle._observers.append(lambda layer, q, k, scale: focus_by_layer.append(
            round(float(focus((torch.matmul(q[:, :, :1].float(), k.float().transpose(-1, -2)) * scale).softmax(-1),
                              k.shape[2]).mean()), 4)))
        model(normalize(images[:500]))
        handle.remove()
    result = {"command": " ".join(["python", "benchmarks/exploration/vision_focus_weight.py", *sys.argv[1:]]),
              "images": len(base), "unpatched": 100 * sum(base) / len(base),
              "class_token_focus_by_block_unpatched_first_500": focus_by_layer, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
