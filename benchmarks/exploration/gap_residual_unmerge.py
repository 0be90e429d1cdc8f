"""The residual unmerge for an average-pooled classifier whose head norms every token before the mean.

    python benchmarks/exploration/gap_residual_unmerge.py --split heldout --out results/gap_residual_heldout.json
    python benchmarks/exploration/gap_residual_unmerge.py --split test --out results/gap_residual_test.json

SigLIP's and DINOv2's classifiers (and a timm ViT whose head was reset to ``global_pool="avg"``) average the
*normed* tokens. Merged, the pool is the size-weighted mean of the normed merged tokens (copying: each patch reads
its group's token). The residual unmerge (stop 59, the default of the dense heads) would give each patch its own
residual stream back (the group's token plus what the patch lost at each merge), norm every patch, then average.
Which is closer to the unmerged model is measured here on the average-pooled reference ViT of
``vision_gap_pooling.py`` (its weights, ``results/vision_gap_vit.pt``, made by that script; ``--no-class-token``:
its model without a class token, stop 62): for each matching and ``--r``, the mean over the unmerged, normed
last-block feature map (``forward_intermediates(..., norm=True)``) under ``unmerge="residual"`` and ``"copy"``, fed
to the same head; top-1 and KL(unmerged || merged) per image, paired 95% bootstrap intervals of residual minus
copying and of each minus the unmerged model. The patched model's own forward runs under each unmerge too and must
equal that unmerge's reading (``*_reading_vs_forward_max_abs_logit_difference``; stop 61 ran before the residual
default, when the forward was copying's): the readings are what the model computes.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.vision import patch
from quickmerge.vision.train import split_train_heldout
from vision_gap_pooling import gap_model

BATCH = 500


def load_gap_vit(weights: str, class_token: bool = True) -> torch.nn.Module:
    """The average-pooled reference ViT ``vision_gap_pooling.py`` fine-tuned (its saved state dict), in eval mode;
    ``class_token=False``: its ``--no-class-token`` model."""
    model = gap_model(class_token)
    model.load_state_dict(torch.load(weights))
    return model.eval()


def pooled_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, classes]``: the head on the mean over the unmerged, normed last-block feature map ``[B, C, H, W]``."""
    (maps,) = model.forward_intermediates(x, indices=[len(model.blocks) - 1], norm=True, intermediates_only=True)
    return model.head(model.fc_norm(maps.mean(dim=(2, 3))))


def run(model, images, labels, settings: dict | None) -> dict:
    """Per image: the forward's logits (unpatched: ``forward``; patched: ``forward_residual`` / ``forward_copy``,
    the model's own forward under each unmerge), and (patched) the feature-map readings under each unmerge."""
    out = {"forward": [], "residual": [], "copy": [], "forward_residual": [], "forward_copy": []}
    handle = None if settings is None else patch(model, **settings)
    try:
        with torch.inference_mode():
            for i in range(0, len(images), BATCH):
                x = normalize(images[i:i + BATCH])
                if handle is None:
                    out["forward"].append(model(x))
                    continue
                for unmerge in ("residual", "copy"):
                    handle.unmerge = unmerge
                    out[f"forward_{unmerge}"].append(model(x))
                    out[unmerge].append(pooled_logits(model, x))
    finally:
        if handle is not None:
            handle.remove()
    return {k: torch.cat(v) for k, v in out.items() if v}


def kl(base: torch.Tensor, logits: torch.Tensor) -> list[float]:
    """KL(base || logits) per image, nats."""
    lp, lq = base.log_softmax(-1), logits.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", choices=["heldout", "test"], required=True)
    ap.add_argument("--r", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--methods", nargs="+", default=["quickmerge", "tome"], choices=["quickmerge", "tome"])
    ap.add_argument("--weights", default="results/vision_gap_vit.pt")
    ap.add_argument("--no-class-token", action="store_true", help="weights of vision_gap_pooling.py --no-class-token")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--images", type=int, default=None, help="the first N images of the split (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_gap_vit(args.weights, class_token=not args.no_class_token)
    images, labels = split_train_heldout()[1] if args.split == "heldout" else load_fashion_mnist("test")
    images, labels = images[:args.images], labels[:args.images]
    base = run(model, images, labels, None)["forward"]
    with torch.inference_mode():
        own = torch.cat([pooled_logits(model, normalize(images[i:i + BATCH])) for i in range(0, len(images), BATCH)])
    hit = lambda logits: (logits.argmax(-1) == labels).float().tolist()  # noqa: E731
    result = {"command": " ".join(["python", "benchmarks/exploration/gap_residual_unmerge.py", *sys.argv[1:]]),
              "machine": f"{args.threads} CPU threads", "split": args.split, "images": len(images),
              "unmerged_top1": bootstrap_mean(hit(base)),
              "unmerged_feature_map_reading_max_abs_logit_difference": float((own - base).abs().max()), "rows": []}
    print("unmerged", result["unmerged_top1"], "reading check", result[
        "unmerged_feature_map_reading_max_abs_logit_difference"], flush=True)
    for r in tqdm(args.r, desc="r"):
        for method in args.methods:
            logits = run(model, images, labels, dict(r=r, method=method))
            top1 = {k: hit(logits[k]) for k in ("residual", "copy")}
            kls = {k: kl(base, logits[k]) for k in ("residual", "copy")}
            row = {"r": r, "method": method,
                   # stop 61 ran before the residual default: its "forward" was copying's (stop 62 splits the two)
                   **{f"{k}_reading_vs_forward_max_abs_logit_difference":
                      float((logits[k] - logits[f"forward_{k}"]).abs().max()) for k in ("residual", "copy")},
                   **{f"{k}_top1": bootstrap_mean(top1[k]) for k in top1},
                   **{f"{k}_top1_minus_unmerged": bootstrap_difference(top1[k], hit(base)) for k in top1},
                   "residual_minus_copy_top1": bootstrap_difference(top1["residual"], top1["copy"]),
                   **{f"{k}_kl": bootstrap_mean(kls[k]) for k in kls},
                   "residual_minus_copy_kl": bootstrap_difference(kls["residual"], kls["copy"])}
            result["rows"].append(row)
            print({k: (tuple(round(x, 5) for x in v) if isinstance(v, tuple) else v) for k, v in row.items()},
                  flush=True)
    result["note"] = ("(mean, low, high): 95% percentile bootstrap over images; differences paired; top-1 as "
                      "fractions, KL in nats per image against the unpatched model's forward")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
