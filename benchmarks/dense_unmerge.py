"""Dense prediction from merged tokens: a per-pixel segmentation read off the tokens put back on the patch grid.

    python benchmarks/dense_unmerge.py --out docs/results/issue11/dense_unmerge.json \
        --plot docs/img/dense_unmerge.png        # ~2 min head training, then ~10 min of evaluation on 2 cores

A merged ViT has fewer tokens than patches, so a dense head (segmentation, depth) needs them back on the grid:
every patch takes the token it was merged into plus what its own residual stream lost at each merge (``unmerge=
"residual"``, the default; the ``-copy`` methods take the token alone, ToMe for Stable Diffusion's unmerge); what
``quickmerge.patch`` does inside Dinov2Backbone, DPT and Depth Anything, and in timm's ``forward_intermediates``,
which this script reads the tokens from, as a dense head on timm does. No pretrained dense model or dense dataset is
obtainable here, so the task is built from real images: each of Fashion-MNIST's 28x28 pixels is background (value 0)
or belongs to the image's garment class (11 classes in all). The shipped reference ViT (90.85%; 196 patch tokens of
2x2 pixels, 6 blocks) stays frozen; a linear head on each final patch token predicts its 2x2 pixels, trained on the
unmerged model's tokens of ``--train-images`` training images (AdamW, cross-entropy over pixels).

Then, on the 10,000 test images and the same run, for QuickMerge++ (defaults) and ToMe-style matching at each
``--r``: pixel accuracy (mean over images) and mean IoU over the 11 classes (from the summed confusion matrix), each
with a 95% bootstrap interval over images, and the paired differences QuickMerge++ minus ToMe-style and merged minus
unmerged; images/s of the whole dense pass (tokens, unmerge, head) against the unpatched model, timed interleaved.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from reporting import command_line, figure, interval_line, save_figure
from tqdm import tqdm

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.patch import LEGACY_MATCHING
from quickmerge.vision.train import HELD_OUT, split_train_heldout

CLASSES = 11  # background, then the 10 garment classes
GRID, PATCH = 14, 2
# QuickMerge++ as stops 57-60 ran it: patch's defaults of then (keys, additive saliency), named so the rows keep
# their meaning; "quickmerge-chosen" is patch's default since stop 72
LEGACY = dict(method="quickmerge", **LEGACY_MATCHING)
METHODS = {"quickmerge": LEGACY, "tome": dict(method="tome"),
           "quickmerge-hidden": {**LEGACY, "similarity": "hidden"},
           "quickmerge-chosen": dict(method="quickmerge", similarity="hidden", saliency_rule="scaled"),
           "quickmerge-unweighted": {**LEGACY, "saliency_weight": 0.0},
           "quickmerge-copy": {**LEGACY, "unmerge": "copy"},
           "tome-copy": dict(method="tome", unmerge="copy")}
LABELS = {"quickmerge": "QuickMerge++", "tome": "ToMe-style", "quickmerge-hidden": "QuickMerge++, hidden similarity",
          "quickmerge-unweighted": "QuickMerge++, saliency weight 0",
          "quickmerge-chosen": "QuickMerge++, hidden + scaled (the default since stop 72)",
          "quickmerge-copy": "QuickMerge++, unmerged by copying", "tome-copy": "ToMe-style, unmerged by copying"}
BATCH = 500


def pixel_labels(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[N, 28, 28]`` long: 0 where the uint8 image is 0, else 1 + the image's class."""
    return torch.where(images[:, 0] > 0, labels[:, None, None] + 1, 0)


def patch_tokens(model: torch.nn.Module, images: torch.Tensor, blocks: list[int]) -> torch.Tensor:
    """``[B, 196, len(blocks) * C]`` the outputs of ``blocks`` (normed by the final norm, concatenated per patch) on
    the patch grid, row-major, read as a dense head on timm reads them, from ``forward_intermediates``' feature maps
    ``[B, C, 14, 14]`` (merged tokens unmerged there, each block's at its own stage)."""
    maps = model.forward_intermediates(normalize(images), indices=blocks, norm=True, intermediates_only=True)
    return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)


def pixel_logits(head: torch.nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, 196, C]`` patch tokens -> ``[B, 11, 28, 28]`` pixel logits (each token predicts its 2x2 pixels)."""
    b = tokens.shape[0]
    out = head(tokens).view(b, GRID, GRID, PATCH, PATCH, CLASSES)
    return out.permute(0, 5, 1, 3, 2, 4).reshape(b, CLASSES, GRID * PATCH, GRID * PATCH)


def train_head(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, epochs: int,
               lr: float, blocks: list[int]) -> tuple[torch.nn.Linear, list[float]]:
    with torch.no_grad():
        feats = torch.cat([patch_tokens(model, images[i:i + BATCH], blocks) for i in
                           tqdm(range(0, len(images), BATCH), desc="head features")])
    torch.manual_seed(0)
    head = torch.nn.Linear(feats.shape[-1], PATCH * PATCH * CLASSES)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(images) + 255) // 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in tqdm(range(epochs), desc="head epochs"):
        total = 0.0
        for idx in torch.randperm(len(images), generator=gen).split(256):
            loss = F.cross_entropy(pixel_logits(head, feats[idx]), targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        losses.append(total / len(images))
    return head.eval(), losses


def confusions(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B, 11, 11]`` per-image confusion counts (rows: true class)."""
    b = target.shape[0]
    index = (target.view(b, -1) * CLASSES + pred.view(b, -1))
    return F.one_hot(index, CLASSES * CLASSES).sum(dim=1).view(b, CLASSES, CLASSES).float()


def miou(conf: torch.Tensor) -> torch.Tensor:
    """``[..., 11, 11]`` summed confusion -> ``[...]`` mean IoU over the classes present."""
    tp = conf.diagonal(dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    iou = tp / union.clamp_min(1)
    return (iou * (union > 0)).sum(-1) / (union > 0).sum(-1)


def bootstrap_miou(conf: torch.Tensor, base: torch.Tensor | None = None, samples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """mIoU of ``conf [N, 11, 11]`` (minus that of ``base`` on the same resampled images) and its 95% interval."""
    gen = torch.Generator().manual_seed(seed)
    n = conf.shape[0]
    counts = torch.stack([torch.bincount(torch.randint(0, n, (n,), generator=gen), minlength=n)
                          for _ in range(samples)]).double()  # [samples, N] times each image is drawn
    flat = conf.double().view(n, -1)
    values = miou((counts @ flat).view(samples, CLASSES, CLASSES))
    point = miou(flat.sum(0).view(CLASSES, CLASSES))
    if base is not None:
        flat_base = base.double().view(n, -1)
        values = values - miou((counts @ flat_base).view(samples, CLASSES, CLASSES))
        point = point - miou(flat_base.sum(0).view(CLASSES, CLASSES))
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(point), low, high


def evaluate(model, head, images, targets, settings: dict | None, blocks: list[int]) -> dict:
    handle = None if settings is None else patch(model, **settings)
    accuracy, confusion, tokens = [], [], []
    try:
        with torch.no_grad():
            for i in range(0, len(images), BATCH):
                pred = pixel_logits(head, patch_tokens(model, images[i:i + BATCH], blocks)).argmax(1)
                target = targets[i:i + BATCH]
                accuracy += (pred == target).float().mean(dim=(1, 2)).tolist()
                confusion.append(confusions(pred, target))
                if handle is not None:
                    tokens.append(handle.mean_tokens)
    finally:
        if handle is not None:
            handle.remove()
    return {"accuracy": accuracy, "confusion": torch.cat(confusion),
            "mean_tokens": sum(tokens) / len(tokens) if tokens else float(model.patch_embed.num_patches + 1)}


def timed(model, head, images, settings: list[dict | None], rounds: int, blocks: list[int]) -> list[float]:
    """Images/s of the dense pass under each setting (None: unpatched), all in each round, order rotating."""
    seconds = [0.0] * len(settings)
    for k in tqdm(range(rounds), desc="timing rounds"):
        for j in range(len(settings)):
            i = (j + k) % len(settings)
            handle = None if settings[i] is None else patch(model, **settings[i])
            with torch.no_grad():
                began = time.perf_counter()
                for s in range(0, len(images), BATCH):
                    pixel_logits(head, patch_tokens(model, images[s:s + BATCH], blocks)).argmax(1)
                seconds[i] += time.perf_counter() - began
            if handle is not None:
                handle.remove()
    return [rounds * len(images) / s for s in seconds]


def plot(result: dict, path: Path) -> None:
    fig, axes = figure()
    for method, label in LABELS.items():
        rows = [r for r in result["rows"] if r["method"] == method]
        if not rows:
            continue
        speed = [r["speedup"] for r in rows]
        for ax, metric in ((axes[0], "miou"), (axes[1], "pixel_accuracy")):
            interval_line(ax, speed, [r[metric] for r in rows], label, scale=100)
    for ax, metric, name in ((axes[0], "miou", "mean IoU (%)"), (axes[1], "pixel_accuracy", "pixel accuracy (%)")):
        ax.axhline(100 * result["unmerged"][metric][0], color="gray", ls="--", label="unmerged")
        ax.set(xlabel="speed-up of the dense pass over the unpatched model", ylabel=name)
    blocks = ", ".join(str(b) for b in result["blocks"])
    axes[0].set_title(f"per-pixel segmentation from block{'s' * (len(result['blocks']) > 1)} {blocks}, unmerged")
    axes[1].set_title("reference ViT (frozen), Fashion-MNIST test set")
    save_figure(fig, axes, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--split", choices=["test", "heldout"], default="test",
                        help="evaluate on the test set, or on the reference ViT's 5,000 held-out training images "
                             "(the last ones; to choose a setting before the test set sees it)")
    parser.add_argument("--test-images", type=int, default=10000, help="the first N images of the split")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--r", type=int, nargs="+", default=[8, 16, 24, 28])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--timing-images", type=int, default=2000)
    parser.add_argument("--timing-rounds", type=int, default=3)
    parser.add_argument("--blocks", type=int, nargs="+", default=[5],
                        help="blocks (0-based) whose normed outputs the head reads, concatenated per patch (a "
                             "multi-level head, as DPT's, reads several); default: the last of the 6")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None, help="also draw the figure here (PNG)")
    args = parser.parse_args()
    if not args.blocks or any(not 0 <= b < 6 for b in args.blocks) or len(set(args.blocks)) != len(args.blocks):
        parser.error(f"--blocks must be distinct block indices in [0, 5], got {args.blocks}")
    if not 0 < args.train_images <= 60000:
        parser.error(f"--train-images must be in [1, 60000], got {args.train_images}")
    available = 10000 if args.split == "test" else HELD_OUT
    if not 0 < args.test_images <= available:
        parser.error(f"--test-images must be in [1, {available}] for --split {args.split}, got {args.test_images}")
    torch.set_num_threads(args.threads)
    model = load_fashion_vit().eval()
    train_images, train_labels = load_fashion_mnist("train")
    head, losses = train_head(model, train_images[:args.train_images],
                              pixel_labels(train_images[:args.train_images], train_labels[:args.train_images]),
                              args.epochs, args.lr, args.blocks)
    images, labels = load_fashion_mnist("test") if args.split == "test" else split_train_heldout()[1]
    images, labels = images[:args.test_images], labels[:args.test_images]
    targets = pixel_labels(images, labels)
    unmerged = evaluate(model, head, images, targets, None, args.blocks)
    names = [(m, r) for r in args.r for m in args.methods]
    settings = [dict(METHODS[m], r=r) for m, r in names]
    runs = {(m, r): evaluate(model, head, images, targets, s, args.blocks)
            for (m, r), s in tqdm(list(zip(names, settings, strict=True)), desc="settings")}
    speed = timed(model, head, images[:args.timing_images], [None, *settings], args.timing_rounds, args.blocks)
    rows = []
    for ((method, r), run), images_per_s in zip(runs.items(), speed[1:], strict=True):
        row = {"method": method, "r": r, "settings": dict(METHODS[method], r=r), "mean_tokens_per_block":
               run["mean_tokens"], "pixel_accuracy": bootstrap_mean(run["accuracy"]),
               "miou": bootstrap_miou(run["confusion"]),
               "pixel_accuracy_minus_unmerged": bootstrap_difference(run["accuracy"], unmerged["accuracy"]),
               "miou_minus_unmerged": bootstrap_miou(run["confusion"], unmerged["confusion"]),
               "images_per_s": images_per_s, "speedup": images_per_s / speed[0]}
        rival = "tome-copy" if method.endswith("-copy") else "tome"  # ToMe-style unmerged the same way
        if method != rival and (rival, r) in runs:
            tome = runs[(rival, r)]
            row["minus_tome"] = {"pixel_accuracy": bootstrap_difference(run["accuracy"], tome["accuracy"]),
                                 "miou": bootstrap_miou(run["confusion"], tome["confusion"])}
        if (f"{method}-copy", r) in runs:  # the residual unmerge against copying, same merges
            copy = runs[(f"{method}-copy", r)]
            row["minus_copy"] = {"pixel_accuracy": bootstrap_difference(run["accuracy"], copy["accuracy"]),
                                 "miou": bootstrap_miou(run["confusion"], copy["confusion"])}
        rows.append(row)
    result = {"command": command_line("dense_unmerge.py", args),
              "machine": f"{torch.get_num_threads()} CPU threads", "images": len(images), "blocks": args.blocks,
              "head_training_loss_per_epoch": losses,
              "unmerged": {"pixel_accuracy": bootstrap_mean(unmerged["accuracy"]),
                           "miou": bootstrap_miou(unmerged["confusion"]), "images_per_s": speed[0]},
              "rows": rows,
              "note": "(mean, low, high): the value on the test images and its 95% bootstrap interval over "
                      "images (mIoU from the summed confusion matrix of each resample); differences paired over "
                      "the same images; images/s of the dense pass timed interleaved with the unpatched model"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        plot(result, args.plot)
    u = result["unmerged"]
    print(f"unmerged: pixel accuracy {u['pixel_accuracy'][0]:.4f} mIoU {u['miou'][0]:.4f}")
    for row in rows:
        d = row["miou_minus_unmerged"]
        line = (f"{row['method']:>10} r={row['r']:<2} tokens {row['mean_tokens_per_block']:.1f} "
                f"acc {row['pixel_accuracy'][0]:.4f} mIoU {row['miou'][0]:.4f} ({d[0]:+.4f} [{d[1]:+.4f}, "
                f"{d[2]:+.4f}]) speed-up {row['speedup']:.2f}x")
        for key, name in (("minus_tome", "tome"), ("minus_copy", "copy")):
            if key in row:
                t = row[key]["miou"]
                line += f" vs {name} mIoU {t[0]:+.4f} [{t[1]:+.4f}, {t[2]:+.4f}]"
        print(line)


if __name__ == "__main__":
    main()
