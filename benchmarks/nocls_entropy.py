"""QuickMerge++'s entropy schedule on a ViT without a class token (stop 71).

    python benchmarks/nocls_entropy.py --split heldout --out results/s71/nocls_entropy_heldout.json
    python benchmarks/nocls_entropy.py --split test --out results/s71/nocls_entropy_test.json

Without a class token the per-block budget is calibrated on the patch tokens' own attention
(:func:`~quickmerge.vision.budget.block_attention_perplexity`, every patch query averaged). On stop 62's
no-class-token ViT (as ``nocls_saliency.py``), at the cost of a constant r per block: r = 48 bipartite (within
ToMe-style's cap) and r = 96 / 128 greedy (past it, down to the floor of 8 tokens), QuickMerge++'s entropy schedule
against its constant schedule (and ToMe-style at r = 48), calibrated on the first 512 held-out training images as
``quickmerge eval vision`` calibrates; the held-out split is the other 4,488. Per image: KL(unmerged || merged) in
millinats and top-1, paired 95% bootstrap intervals of the entropy schedule minus the constant one.
``--timing-rounds N``: every setting also timed together against the unpatched model (speed-up, the median of the
rounds' ratios).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from nocls_saliency import add_model_arguments, interval, load_model, log_probs
from tqdm import tqdm

from quickmerge.cli_types import non_negative_int, positive_int
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.stats import bootstrap_mean
from quickmerge.eval.vision import time_settings_together
from quickmerge.vision import patch
from quickmerge.vision.budget import DEFAULT_FLOOR, block_attention_perplexity, constant_schedule, entropy_schedule
from quickmerge.vision.patch import LEGACY_MATCHING
from quickmerge.vision.train import split_train_heldout

CALIBRATION = 512  # the first held-out images, as eval vision's calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--split", choices=("heldout", "test"), default="heldout",
                    help="heldout: the held-out training images after the calibration's (512..4999 by default); "
                         "test: the 10,000 test images")
    ap.add_argument("--calibration-images", type=positive_int, default=CALIBRATION,
                    help="the first held-out images the entropy budget is calibrated on (default: 512, as eval vision)")
    ap.add_argument("--bipartite-r", type=positive_int, nargs="*", default=[48], help="costs within the cap")
    ap.add_argument("--greedy-r", type=positive_int, nargs="*", default=[96, 128], help="costs past the cap")
    ap.add_argument("--timing-rounds", type=non_negative_int, default=0,
                    help="also time every setting together on a batch of 256 (rounds in rotating order, each right "
                         "before the unpatched model; 0: no timing)")
    ap.add_argument("--out", required=True, help="JSON path")
    args = ap.parse_args()
    held_images, held_labels = split_train_heldout()[1]
    calibration = args.calibration_images
    if calibration >= len(held_images):
        ap.error(f"--calibration-images: expected fewer than the {len(held_images)} held-out images, "
                 f"got {calibration}")
    model = load_model(ap, args)
    perplexity = block_attention_perplexity(model, normalize(held_images[:calibration]))
    print("block perplexity", [round(p, 1) for p in perplexity], flush=True)
    if args.split == "heldout":
        images, labels = held_images[calibration:], held_labels[calibration:]
    else:
        images, labels = load_fashion_mnist("test")
    images, labels = images[: args.images], labels[: args.images]
    n, depth = model.patch_embed.num_patches, len(model.blocks)
    settings = []  # (cost r, matching, label, method, schedule, options)
    legacy = dict(LEGACY_MATCHING)  # QuickMerge++ as stop 71 ran it, patch's defaults of then
    for r in args.bipartite_r:
        settings += [(r, "bipartite", "tome", "tome", r, {}),
                     (r, "bipartite", "constant", "quickmerge", r, legacy),
                     (r, "bipartite", "entropy", "quickmerge", entropy_schedule(perplexity, n, r), legacy)]
    for r in args.greedy_r:
        greedy = {"matching": "greedy", **legacy}
        settings += [(r, "greedy", "constant", "quickmerge",
                      constant_schedule(n, r, depth, DEFAULT_FLOOR, bipartite=False), greedy),
                     (r, "greedy", "entropy", "quickmerge",
                      entropy_schedule(perplexity, n, r, floor=DEFAULT_FLOOR, bipartite=False), greedy)]
    base = log_probs(model, images)
    base_hits = (base.argmax(-1) == labels).double()
    result = {"command": " ".join(["python", "benchmarks/nocls_entropy.py", *sys.argv[1:]]), "split": args.split,
              "images": len(images), "calibration_images": calibration, "block_perplexity": perplexity,
              "unpatched_top1": round(100 * base_hits.mean().item(), 3), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "platform": platform.platform(), "rows": [], "comparisons": []}
    per_image = {}
    for r, matching, label, method, schedule, options in tqdm(settings, desc="settings", unit="setting"):
        with patch(model, r=schedule, method=method, **options) as handle:
            merged = log_probs(model, images)
            tokens = handle.mean_tokens
        kl = (base.exp() * (base - merged)).sum(-1).tolist()
        hits = (merged.argmax(-1) == labels).double().tolist()
        per_image[r, matching, label] = (kl, hits)
        result["rows"].append({"r": r, "matching": matching, "setting": label,
                               "schedule": schedule if isinstance(schedule, list) else [schedule] * depth,
                               "mean_tokens_per_block": round(float(tokens), 2),
                               "kl_millinats": [round(1e3 * v, 4) for v in bootstrap_mean(kl)],
                               "top1": round(100 * sum(hits) / len(hits), 3)})
        print(result["rows"][-1], flush=True)
    for r, matching, label, *_ in settings:
        if label == "entropy":
            (kl_e, hits_e), (kl_c, hits_c) = per_image[r, matching, "entropy"], per_image[r, matching, "constant"]
            comparison = {"r": r, "matching": matching, "comparison": "entropy minus constant",
                          "kl_millinats": interval(kl_e, kl_c, 1e3), "top1_pt": interval(hits_e, hits_c, 100)}
            result["comparisons"].append(comparison)
            print(comparison, flush=True)
    if args.timing_rounds:
        jobs = [(method, schedule, options) for _, _, _, method, schedule, options in settings]
        timed = time_settings_together(model, jobs, normalize(images[:256]), args.timing_rounds)
        for row, fields in zip(result["rows"], timed, strict=True):
            row.update({k: fields[k] for k in ("speedup", "speedup_per_round", "images_per_s",
                                               "unpatched_images_per_s")})
        result["timing"] = {"rounds": args.timing_rounds, "batch": 256}
        print({f"{row['r']} {row['matching']} {row['setting']}": row["speedup"] for row in result["rows"]}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
