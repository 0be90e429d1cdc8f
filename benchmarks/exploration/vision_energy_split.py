"""Which tokens may merge, chosen by redundancy energy instead of ToMe's spatial halves. Held-out images only.

    python benchmarks/exploration/vision_energy_split.py [--r 16 32 48 64] [--out results/vision_energy_split.json]

ToMe-style matching (and QuickMerge++'s default, which only lowers each edge by the source's saliency rank) splits
the tokens into alternating spatial halves and lets any token of one half merge away. A substantially different
candidate rule, after PiToMe (Tran et al., NeurIPS 2024): each token's *energy* is its mean soft-thresholded cosine
similarity to every other token, ``E_i = mean_j f(cos_ij)`` with ``f(x) = x`` above a margin ``m`` and
``exp(x - m) - 1`` below it (``m = 0.9 - 0.9 l / L`` in block ``l`` of ``L``); only the ``2r`` tokens of highest
energy (those in large clusters of near-duplicates) take part, split alternately by energy order, and each of the
``r`` sources merges into its most similar partner; low-energy tokens (isolated, informative ones) are never merged.
QuickMerge++'s variant orders the tokens by ``rank(E) - w * rank(saliency)``: redundancy and entropy-aware
saliency together. Every row minus ToMe-style at the same r, paired 95% bootstrap intervals (points), on the last
5,000 training images (never trained on).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from quickmerge.eval.stats import bootstrap_difference
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.primitives import rank01
from quickmerge.vision import patch
from quickmerge.vision.train import correct_per_image, split_train_heldout

MODE = {"variant": None, "layer": 0, "layers": 6}
module = sys.modules["quickmerge.vision.patch"]  # not the function quickmerge.vision exports under that name


def energy_assign(metric: torch.Tensor, order_score: torch.Tensor, sim: torch.Tensor, r: int) -> torch.Tensor:
    """``dst [B, T]``: the 2r tokens of highest ``order_score`` split alternately; each source joins its best partner."""
    b, t = order_score.shape
    cand = order_score.argsort(dim=-1, descending=True)[:, : 2 * r]
    src, dstset = cand[:, ::2], cand[:, 1::2]  # [B, r] each
    pair = sim.gather(1, src[..., None].expand(b, r, t)).gather(2, dstset[:, None, :].expand(b, r, r))
    target = dstset.gather(1, pair.argmax(dim=-1))  # [B, r] token index each source joins
    is_removed = torch.zeros(b, t, dtype=torch.bool, device=metric.device).scatter_(1, src, True)
    group_of_kept = (~is_removed).long().cumsum(dim=1) - 1
    return group_of_kept.scatter(1, src, group_of_kept.gather(1, target))


def assign(metric, saliency, r, saliency_weight):
    mn = F.normalize(metric.float(), dim=-1)
    sim = torch.matmul(mn, mn.transpose(1, 2))
    margin = 0.9 - 0.9 * MODE["layer"] / MODE["layers"]
    soft = torch.where(sim >= margin, sim, torch.exp(sim - margin) - 1.0)
    soft.diagonal(dim1=1, dim2=2).zero_()
    energy = soft.sum(-1) / (sim.shape[-1] - 1)
    variant = MODE["variant"]
    if variant == "energy":
        score = energy
    elif variant == "energy_saliency":
        score = rank01(energy) - saliency_weight * rank01(saliency)
    else:
        raise AssertionError(variant)
    return energy_assign(metric, score, sim, r)


default_assign = module.quickmerge_bipartite_assign


def dispatch(metric, saliency, r, saliency_weight):
    if MODE["variant"] is None:
        return default_assign(metric, saliency, r, saliency_weight)
    return assign(metric, saliency, r, saliency_weight)


module.quickmerge_bipartite_assign = dispatch

SETTINGS = [
    ("tome", None, {}),
    ("quickmerge", None, {}),
    ("quickmerge", "energy", {}),
    ("quickmerge", "energy_saliency", {"saliency_weight": 0.25}),
    ("quickmerge", "energy_saliency", {"saliency_weight": 0.5}),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, nargs="+", default=[16, 32, 48, 64])
    ap.add_argument("--images", type=int, default=5000, help="the first N of the 5,000 held-out images")
    ap.add_argument("--out", default="results/vision_energy_split.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_fashion_vit()
    _, (images, labels) = split_train_heldout()
    images, labels = images[: args.images], labels[: args.images]
    rows = []
    with torch.inference_mode():
        base = correct_per_image(model, images, labels).float().tolist()
        for r in args.r:
            hits = {}
            for method, variant, extra in SETTINGS:
                MODE["variant"] = variant
                with patch(model, r=r, method=method, **extra) as handle:
                    MODE["layers"] = handle.num_layers
                    handle._observers.append(lambda layer, q, k, scale: MODE.update(layer=layer))
                    key = (method, variant, extra.get("saliency_weight"))
                    hits[key] = correct_per_image(model, images, labels).float().tolist()
                print(method, variant, extra, r, 100 * sum(hits[key]) / len(hits[key]), flush=True)
            ref = hits[("tome", None, None)]
            for (method, variant, weight), h in hits.items():
                rows.append({"r": r, "method": method, "variant": variant, "saliency_weight": weight,
                             "accuracy": 100 * sum(h) / len(h),
                             "minus_tome_pt": [round(100 * v, 3) for v in bootstrap_difference(h, ref)]})
    result = {"command": " ".join(["python", "benchmarks/exploration/vision_energy_split.py", *sys.argv[1:]]),
              "images": len(base), "unpatched": 100 * sum(base) / len(base), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
