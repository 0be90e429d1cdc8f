"""Exploration: does a residual unmerge beat copying for a dense head on merged tokens?

Copying (``expand_to_patches``) gives every patch of a group the group's token. The residual stream of a ViT is a
sum: the first block's input ``e_p`` plus every branch's output; a merged group's token carries the group's mean of
``e``. A residual unmerge gives patch ``p`` the group's token plus ``alpha * (e_p - mean_group(e))``, its own part
of the first block's input back (``alpha = 1``: exactly the part merging averaged away), then the final norm.

Same task and head as ``benchmarks/dense_unmerge.py`` (the last block's normed patch tokens, a linear head trained
on the unmerged model), evaluated on the reference ViT's held-out training images (the setting is chosen there).

    python benchmarks/exploration/dense_residual_unmerge.py --out docs/results/issue11/dense_residual_unmerge.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dense_unmerge import (  # noqa: E402
    BATCH,
    METHODS,
    bootstrap_miou,
    confusions,
    pixel_labels,
    pixel_logits,
    train_head,
)
from reporting import command_line  # noqa: E402

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize  # noqa: E402
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean  # noqa: E402
from quickmerge.pretrained.fashion_vit import load_fashion_vit  # noqa: E402
from quickmerge.vision import patch  # noqa: E402
from quickmerge.vision.train import split_train_heldout  # noqa: E402


def residual_tokens(model, handle, images: torch.Tensor, alphas: list[float]) -> dict[str, torch.Tensor]:
    """``[B, 196, C]`` normed last-block patch tokens per unmerge: ``copy``; ``embedding a``, the first block's input
    deviation from its group's mean added back times ``a``; ``merge a``, at every merge the patch's deviation from
    the token its group became (the residual stream just before that merge), summed over the merges, times ``a``."""
    seen: dict[str, list[torch.Tensor]] = {"h": [], "m": []}
    hooks = [model.blocks[0].register_forward_pre_hook(lambda _m, args: seen.__setitem__("e", [args[0]])),
             model.blocks[-1].register_forward_hook(lambda _m, _a, out: seen.__setitem__("y", [out]))]
    for block in model.blocks:  # the merge is norm2's pre-hook: capture its input before it, its output after
        hooks.append(block.norm2.register_forward_pre_hook(lambda _m, args: seen["h"].append(args[0]), prepend=True))
        hooks.append(block.norm2.register_forward_pre_hook(lambda _m, args: seen["m"].append(args[0])))
    try:
        model.forward_features(normalize(images))
    finally:
        for h in hooks:
            h.remove()
    (e,), (y,) = seen["e"], seen["y"]
    names = ["copy"] + [f"{kind} {a:g}" for kind in ("embedding", "merge") for a in alphas]
    if handle is None or y.shape[1] == e.shape[1]:
        return {n: model.norm(y)[:, 1:] for n in names}
    stages = handle._stages  # (origin [B, 197], size) entering each block, then the output

    def at(stage: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` (the tokens of ``stage``) gathered per original position ``[B, 197, C]``."""
        origin, size = stages[stage]
        return x if size is None else x.gather(1, origin[..., None].expand(-1, -1, x.shape[-1]))

    def group_mean(x: torch.Tensor, stage: int) -> torch.Tensor:
        origin, _ = stages[stage]
        index = origin[..., None].expand(-1, -1, x.shape[-1])
        sums = x.new_zeros(x.shape[0], int(origin.max()) + 1, x.shape[-1]).scatter_add_(1, index, x)
        counts = x.new_zeros(sums.shape[:2]).scatter_add_(1, origin, torch.ones_like(origin, dtype=x.dtype))
        return (sums / counts[..., None]).gather(1, index)

    copied = at(len(stages) - 1, y)
    embedding = e - group_mean(e, len(stages) - 1)
    merge = sum(at(j, h) - at(j + 1, m) for j, (h, m) in enumerate(zip(seen["h"], seen["m"], strict=True)))
    out = {"copy": model.norm(copied)[:, 1:]}
    for a in alphas:
        out[f"embedding {a:g}"] = model.norm(copied + a * embedding)[:, 1:]
        out[f"merge {a:g}"] = model.norm(copied + a * merge)[:, 1:]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--test-images", type=int, default=5000)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--r", type=int, nargs="+", default=[16, 28])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=["quickmerge", "tome"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_fashion_vit().eval()
    train_images, train_labels = load_fashion_mnist("train")
    head, _ = train_head(model, train_images[:args.train_images],
                         pixel_labels(train_images[:args.train_images], train_labels[:args.train_images]),
                         10, 1e-2, [5])
    images, labels = split_train_heldout()[1]
    images, labels = images[:args.test_images], labels[:args.test_images]
    targets = pixel_labels(images, labels)
    runs = {}
    for name, settings in [("unmerged", None)] + [(f"{m} r={r}", dict(METHODS[m], r=r))
                                                   for r in args.r for m in args.methods]:
        handle = None if settings is None else patch(model, **settings)
        acc, conf = {}, {}
        with torch.no_grad():
            for i in range(0, len(images), BATCH):
                target = targets[i:i + BATCH]
                for a, tokens in residual_tokens(model, handle, images[i:i + BATCH], args.alphas).items():
                    pred = pixel_logits(head, tokens).argmax(1)
                    acc.setdefault(a, []).extend((pred == target).float().mean(dim=(1, 2)).tolist())
                    conf.setdefault(a, []).append(confusions(pred, target))
        if handle is not None:
            handle.remove()
        runs[name] = {a: (acc[a], torch.cat(conf[a])) for a in acc}
        print(name, flush=True)
    base = runs["unmerged"]["copy"]
    rows = []
    for name, by_alpha in runs.items():
        for a, (acc, conf) in by_alpha.items():
            copy_acc, copy_conf = by_alpha["copy"]
            row = {"setting": name, "unmerge": a, "pixel_accuracy": bootstrap_mean(acc), "miou": bootstrap_miou(conf),
                   "miou_minus_unmerged": bootstrap_miou(conf, base[1]),
                   "miou_minus_copy": bootstrap_miou(conf, copy_conf),
                   "pixel_accuracy_minus_copy": bootstrap_difference(acc, copy_acc)}
            rows.append(row)
            d = row["miou_minus_copy"]
            print(f"{name:>16} {a:>13}: mIoU {row['miou'][0]:.4f} minus copy {d[0]:+.4f} "
                  f"[{d[1]:+.4f}, {d[2]:+.4f}]", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command_line("exploration/dense_residual_unmerge.py", args),
                                    "images": len(images), "split": "held-out training images", "rows": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
