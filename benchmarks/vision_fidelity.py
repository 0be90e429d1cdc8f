"""How far merging moves a ViT's outputs: QuickMerge++ vs ToMe-style per image, at equal r, off the shelf.

    python benchmarks/vision_fidelity.py --out docs/results/issue11/vision_fidelity.json \
        --plot docs/img/vision_fidelity.png                                  # about 25 minutes on 2 cores

Top-1 on 10,000 images resolves about +-0.2 pt between two merge rules, while merging costs the reference model
at most ~0.45 pt within ToMe-style's cap; so this measures, per test image, the KL divergence from the unmerged
model's ten-class softmax to the merged one's (nats), the true label's cross-entropy (nats), top-1 agreement
with the unmerged model and top-1, for ToMe-style and QuickMerge++ at constant r, QuickMerge++'s entropy
schedule at each r's cost and its per-image budgets (``--per-image-r``). Every row minus ToMe-style at the same
r, and the QuickMerge++ schedules minus QuickMerge++ at constant r, with 95% paired bootstrap intervals over the
images. Plan: ``docs/results/issue11/vision_fidelity_plan.md``. Accuracy-only speeds: see the timed runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from quickmerge.cli_types import non_negative_float
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.eval.vision_cli import SCHEDULES, build_sweep, calibrate, calibrate_image_budgets, quickmerge_options
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.image_budget import ImageBudget, bucketed_forward
from quickmerge.vision.patch import LEGACY_MATCHING
from quickmerge.vision.token_merge import SALIENCY_RULES, SIMILARITIES

METRICS = ("kl", "nll", "agreement", "top1")
DEFAULT_R = (8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 98)


def log_probs(model: torch.nn.Module, images: torch.Tensor, handle=None, budget: ImageBudget | None = None,
              batch_size: int = 500) -> torch.Tensor:
    """``[N, classes]`` float64 log-softmax of ``model`` on uint8 ``images``, per-image budgets run bucketed."""
    out = []
    for i in range(0, len(images), batch_size):
        x = normalize(images[i : i + batch_size])
        logits = model(x) if budget is None else bucketed_forward(model, handle, x, budget)[0]
        out.append(logits.double().log_softmax(-1))
    return torch.cat(out)


def per_image(logp: torch.Tensor, base: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each metric ``[N]`` of merged log-probs ``logp`` against the unmerged ``base`` (both ``[N, classes]``)."""
    return {
        "kl": (base.exp() * (base - logp)).sum(-1),
        "nll": -logp.gather(1, labels[:, None]).squeeze(1),
        "agreement": (logp.argmax(-1) == base.argmax(-1)).double(),
        "top1": (logp.argmax(-1) == labels).double(),
    }


def summarise(rows: dict[tuple[str, int], dict[str, torch.Tensor]], rs: list[int]) -> list[dict]:
    """Per r: each row's means with intervals, and its paired differences to ToMe-style and to constant r."""
    out = []
    for r in rs:
        entry: dict = {"r": r}
        for (label, r_cost), values in rows.items():
            if r_cost != r:
                continue
            row = {m: list(bootstrap_mean(values[m].tolist())) for m in METRICS}
            for ref in ("tome", "quickmerge"):
                if label != ref and (ref, r) in rows and not (ref == "quickmerge" and label == "tome"):
                    row[f"minus_{ref}"] = {m: list(bootstrap_difference(values[m].tolist(), rows[(ref, r)][m].tolist()))
                                           for m in METRICS}
            entry[label] = row
        out.append(entry)
    return out


LABELS = {"tome": ("ToMe-style", "C0"), "quickmerge": ("QuickMerge++ (constant r)", "C1"),
          "quickmerge-entropy": ("QuickMerge++ entropy schedule", "C2"),
          "quickmerge-per-image": ("QuickMerge++ per-image budgets", "C3")}


def plot(summary: list[dict], path: str, title: str, options: dict | None = None) -> None:
    """Left: each row's mean KL against r (log scale); right: each QuickMerge++ row minus ToMe-style, paired CI.

    ``options``: the QuickMerge++ settings that differ from the defaults, named in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(ax, pts, name, color):
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], color=color, label=name, marker="o", ms=4, capsize=2,
                    yerr=[[p[1][0] - p[1][1] for p in pts], [p[1][2] - p[1][0] for p in pts]])

    suffix = ", ".join(f"{k}={v}" for k, v in (options or {}).items())
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, (name, color) in LABELS.items():
        name = name.replace("QuickMerge++", f"QuickMerge++ {suffix}") if suffix else name
        if pts := [(e["r"], e[key]["kl"]) for e in summary if key in e]:
            bars(left, pts, name, color)
        if key != "tome" and (pts := [(e["r"], e[key]["minus_tome"]["kl"]) for e in summary if key in e]):
            bars(right, pts, name, color)
    left.set(xlabel="tokens merged per block (r)", ylabel="KL(unmerged || merged), nats per image", yscale="log",
             title="distance from the unmerged model's outputs")
    left.legend(fontsize=8, loc="upper left")
    right.axhline(0, color="grey", lw=0.8)
    right.set(xlabel="tokens merged per block (r)", ylabel="minus ToMe-style, nats (95% paired CI)",
              title="below 0: closer to the unmerged model than ToMe-style")
    right.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def title(images: int) -> str:
    return f"Fashion-MNIST ViT (90.85%), {images:,} test images, off the shelf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, nargs="+", default=list(DEFAULT_R), help="tokens merged per block")
    parser.add_argument("--per-image-r", type=int, nargs="*", default=[16, 24, 32, 40, 48],
                        help="r values at which QuickMerge++'s per-image budgets run too")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES),
                        help="QuickMerge++ rows: constant r, entropy schedule, per-image budgets (at --per-image-r)")
    parser.add_argument("--similarity", choices=SIMILARITIES, default=LEGACY_MATCHING["similarity"],
                        help="QuickMerge++'s, as patch's (default: the default before stop 72, as this script's rows)")
    parser.add_argument("--saliency-weight", type=non_negative_float, default=None, help="QuickMerge++'s, as patch's")
    parser.add_argument("--saliency-rule", choices=SALIENCY_RULES, default=LEGACY_MATCHING["saliency_rule"],
                        help="QuickMerge++'s, as patch's (default: the default before stop 72, as this script's rows)")
    parser.add_argument("--checkpoint", default=None, help="model directory (default: the shipped reference)")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--out", default="results/vision_fidelity.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the JSON at --out")
    args = parser.parse_args()
    png = args.plot or str(Path(args.out).with_suffix(".png"))
    if args.replot:
        saved = json.loads(Path(args.out).read_text())
        plot(saved["by_r"], png, title(saved["images"]), saved.get("quickmerge_options"))
        return
    if not 1 <= args.images <= 10_000:
        parser.error(f"--images must be in [1, 10000], got {args.images}")
    if "per-image" in args.schedules and not set(args.per_image_r) <= set(args.r):
        parser.error(f"--per-image-r {args.per_image_r} must be a subset of --r {args.r}")
    torch.set_num_threads(2)
    model = load_fashion_vit(args.checkpoint).eval()
    images, labels = load_fashion_mnist("test")
    images, labels = images[: args.images], labels[: args.images].long()
    n = model.patch_embed.num_patches
    chosen = quickmerge_options(args)
    entropy = "entropy" in args.schedules
    sweep = build_sweep(["quickmerge", "tome"], args.r, ["constant", "entropy"] if entropy else ["constant"],
                        calibrate(model) if entropy else None, n, quickmerge_options=chosen)
    sweep = [(m, r, s, r_cost) for (m, r, s), r_cost in zip(sweep, args.r * (3 if entropy else 2), strict=True)]
    if args.per_image_r and "per-image" in args.schedules:
        budgets = calibrate_image_budgets(model, args.per_image_r)
        sweep += [(m, r, s, r) for m, r, s in build_sweep(["quickmerge"], args.per_image_r, ["per-image"],
                                                           num_tokens=n, image_budgets=budgets,
                                                           quickmerge_options=chosen)
                  if s.get("label") == "quickmerge-per-image"]
    rows: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    with torch.inference_mode():
        base = log_probs(model, images)
        for method, r, settings, r_cost in tqdm(sweep, desc="merge settings"):
            options = {k: v for k, v in settings.items() if k not in ("label", "image_budget")}
            budget = ImageBudget(**settings["image_budget"]) if "image_budget" in settings else None
            with patch(model, r=r, method=method, **options) as handle:
                logp = log_probs(model, images, handle, budget)
            rows[(settings.get("label", method), r_cost)] = per_image(logp, base, labels)
    summary = summarise(rows, args.r)
    result = {
        "command": " ".join(["python", "benchmarks/vision_fidelity.py", *sys.argv[1:]]),
        "images": len(images),
        "quickmerge_options": chosen,
        "unpatched_top1": float((base.argmax(-1) == labels).double().mean()),
        "metrics": {"kl": "KL(unmerged || merged), nats per image", "nll": "true-label cross-entropy, nats",
                    "agreement": "top-1 equal to the unmerged model's", "top1": "top-1 accuracy"},
        "note": "each metric as [mean, low, high] (95% bootstrap); minus_X: paired difference to X at the same r",
        "by_r": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    plot(summary, png, title(len(images)), chosen)
    for e in summary:
        for key in ("quickmerge", "quickmerge-entropy", "quickmerge-per-image"):
            if key in e:
                d = e[key]["minus_tome"]
                print(f"r={e['r']:3d} {key:22s} KL-tome {d['kl'][0]:+.5f} [{d['kl'][1]:+.5f}, {d['kl'][2]:+.5f}] "
                      f"top1-tome {100 * d['top1'][0]:+.2f}", flush=True)


if __name__ == "__main__":
    main()
