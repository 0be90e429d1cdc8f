"""Which saliency QuickMerge++ should ask in a ViT without a class token (stop 71).

    python benchmarks/nocls_saliency.py --split heldout --out results/s71/nocls_saliency_heldout.json
    python benchmarks/nocls_saliency.py --split test --timing-rounds 10 --out results/s71/nocls_saliency_test.json

A model without a class token has no query that reads for the head, so QuickMerge++ asks others: 16 queries spread
over the tokens (the default), fewer of them (``saliency_queries``), or one, the mean of all queries
(``saliency="mean"``). Stop 70 compared them on the VideoMAE classifiers only. This script compares them on stop 62's
no-class-token ViT (the shipped reference rebuilt as timm's SigLIP-gap ViTs are, fine-tuned by
``benchmarks/exploration/vision_gap_pooling.py --no-class-token``, whose saved weights ``--weights`` names), with
ToMe-style in the same run. Per image: KL(unmerged || merged) of the ten-class output, in millinats, and top-1;
paired 95% bootstrap intervals of each QuickMerge++ variant minus 16 queries, minus ToMe-style, and of the mean query
minus 4 queries; also stop 47's chosen matching (``similarity="hidden", saliency_rule="scaled"``), which stop 48 had
no second model to confirm on. ``--timing-rounds N``: every setting at ``--timed-r`` timed together (rounds in
rotating order, each right before the unpatched model; the median of the rounds' ratios), after the accuracy passes.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent / "exploration"))

from vision_gap_pooling import gap_model

from quickmerge.cli_types import non_negative_int, positive_int
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.eval.vision import time_settings_together
from quickmerge.vision import patch
from quickmerge.vision.patch import LEGACY_MATCHING
from quickmerge.vision.train import split_train_heldout

BATCH = 500
DEFAULT = "queries=16"
# label -> (method, patch settings); QuickMerge++'s default on this model is 16 spread queries. The saliency variants
# match as patch's defaults of stop 71 did (keys, additive: LEGACY_MATCHING), so the script reproduces its tables
SETTINGS: dict[str, tuple[str, dict]] = {
    "tome": ("tome", {}),
    DEFAULT: ("quickmerge", dict(LEGACY_MATCHING)),
    "queries=4": ("quickmerge", {**LEGACY_MATCHING, "saliency_queries": 4}),
    "queries=8": ("quickmerge", {**LEGACY_MATCHING, "saliency_queries": 8}),
    "mean": ("quickmerge", {**LEGACY_MATCHING, "saliency": "mean"}),
    "hidden+scaled": ("quickmerge", {"similarity": "hidden", "saliency_rule": "scaled"}),  # stop 47's chosen rule
}
# (variant, baseline) pairs reported with paired intervals
COMPARISONS = [*((label, DEFAULT) for label in SETTINGS if label not in ("tome", DEFAULT)),
               *((label, "tome") for label in SETTINGS if label != "tome"), ("mean", "queries=4")]


def log_probs(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``[N, classes]`` float64 log-probabilities of ``model`` on uint8 ``images [N, 1, 28, 28]``."""
    with torch.inference_mode():
        return torch.cat([model(normalize(images[i : i + BATCH])).double().log_softmax(-1)
                          for i in range(0, len(images), BATCH)])


def interval(values: list[float], base: list[float], scale: float) -> list[float]:
    """Paired mean difference and 95% interval of ``values - base``, times ``scale``."""
    return [round(scale * v, 4) for v in bootstrap_difference(values, base)]


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """``--weights``, ``--images`` and ``--threads``: which model, how many of the split's images, torch threads."""
    ap.add_argument("--weights", default="results/vision_gap_nocls_vit.pt",
                    help="the no-class-token model's state dict (vision_gap_pooling.py --no-class-token --weights)")
    ap.add_argument("--images", type=positive_int, default=None, help="only the split's first N images (default: all)")
    ap.add_argument("--threads", type=positive_int, default=2)


def load_model(ap: argparse.ArgumentParser, args: argparse.Namespace) -> torch.nn.Module:
    """The no-class-token ViT of ``--weights`` in eval mode (refused, naming the flag, if the file is missing)."""
    if not Path(args.weights).is_file():
        ap.error(f"--weights: {args.weights} does not exist; make it with benchmarks/exploration/"
                 "vision_gap_pooling.py --no-class-token --weights PATH")
    torch.set_num_threads(args.threads)
    model = gap_model(class_token=False)
    model.load_state_dict(torch.load(args.weights))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--split", choices=("heldout", "test"), default="heldout",
                    help="heldout: the last 5,000 training images; test: the 10,000 test images")
    ap.add_argument("--r", type=positive_int, nargs="+", default=[32, 48, 64], help="tokens merged per block")
    ap.add_argument("--timing-rounds", type=non_negative_int, default=0,
                    help="rounds of the together timing (0: no timing)")
    ap.add_argument("--timed-r", type=positive_int, default=48, help="the r every setting is timed at")
    ap.add_argument("--out", required=True, help="JSON path")
    args = ap.parse_args()
    model = load_model(ap, args)
    images, labels = split_train_heldout()[1] if args.split == "heldout" else load_fashion_mnist("test")
    images, labels = images[: args.images], labels[: args.images]
    base = log_probs(model, images)
    base_hits = (base.argmax(-1) == labels).double()
    result = {"command": " ".join(["python", "benchmarks/nocls_saliency.py", *sys.argv[1:]]),
              "split": args.split, "images": len(images), "unpatched_top1": round(100 * base_hits.mean().item(), 3),
              "settings": {label: {"method": m, **o} for label, (m, o) in SETTINGS.items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
              "rows": []}
    print(f"{args.split}: unpatched top-1 {result['unpatched_top1']:.2f}%", flush=True)
    jobs = [(label, r) for r in args.r for label in SETTINGS]
    per_image: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for label, r in tqdm(jobs, desc="settings", unit="setting"):
        method, options = SETTINGS[label]
        with patch(model, r=r, method=method, **options):
            merged = log_probs(model, images)
        kl = (base.exp() * (base - merged)).sum(-1)
        hits = (merged.argmax(-1) == labels).double()
        per_image[label, r] = (kl.tolist(), hits.tolist())
    for r in args.r:
        for label in SETTINGS:
            kl, hits = per_image[label, r]
            row = {"r": r, "setting": label, "kl_millinats": [round(1e3 * v, 4) for v in bootstrap_mean(kl)],
                   "top1": round(100 * sum(hits) / len(hits), 3),
                   "top1_minus_unpatched_pt": interval(hits, base_hits.tolist(), 100)}
            result["rows"].append(row)
        for variant, baseline in COMPARISONS:
            (kl_v, hits_v), (kl_b, hits_b) = per_image[variant, r], per_image[baseline, r]
            comparison = {"r": r, "comparison": f"{variant} minus {baseline}",
                          "kl_millinats": interval(kl_v, kl_b, 1e3), "top1_pt": interval(hits_v, hits_b, 100)}
            result.setdefault("comparisons", []).append(comparison)
            print(comparison, flush=True)
    if args.timing_rounds:
        batch = normalize(images[:256])
        jobs = [(m, args.timed_r, o) for m, o in SETTINGS.values()]
        timed = time_settings_together(model, jobs, batch, args.timing_rounds)
        fields = dict(zip(SETTINGS, timed, strict=True))
        result["timing"] = {"r": args.timed_r, "rounds": args.timing_rounds, "batch": 256,
                            "speedup": {label: round(t["speedup"], 4) for label, t in fields.items()}, "fields": fields}
        print(result["timing"]["speedup"], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
