"""Size-weighted vs plain average pooling under merging, on a real average-pooled ViT.

    python benchmarks/exploration/vision_gap_pooling.py [--epochs 2] [--r 32 48 64] [--out ...json]
    python benchmarks/exploration/vision_gap_pooling.py --no-class-token --weights results/vision_gap_nocls_vit.pt \
        --out results/vision_gap_nocls_pooling.json

No average-pooled pretrained ViT is obtainable here, so the shipped Fashion-MNIST ViT is turned into one: its
head is reset to ``global_pool="avg"`` (the mean of the final patch tokens, class token left out) and the whole
model fine-tuned for ``--epochs`` on the 55,000 training images (AdamW, lr 5e-4, cosine, label smoothing 0.1,
shifts of up to 2 pixels; the weights are kept in results/ to rerun the evaluation). ``--no-class-token`` (stop 62)
rebuilds it the way timm's SigLIP-gap ViTs are built instead (``class_token=False``, ``global_pool="avg"``,
``fc_norm=False``: the final norm on every token, then their mean, no prefix token), carrying over every weight but
the class token's (and its position), the head reset as above. Then, on the 5,000 held-out
and the 10,000 test images, ToMe-style and QuickMerge++ at each r with the head's mean weighted by token size
(``size_weighted_pool=True``, the default, what ToMe does for MAE models) and plain (False), paired 95%
bootstrap intervals of weighted minus plain (points).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.stats import bootstrap_difference
from quickmerge.pretrained.fashion_vit import ASSET_DIR, build_vit, load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.train import augment, correct_per_image, split_train_heldout


def gap_model(class_token: bool = True) -> torch.nn.Module:
    """The reference ViT with an average-pooling head after its final norm (weights as trained, head reset);
    ``class_token=False``: rebuilt without its class token, as timm's SigLIP-gap ViTs."""
    model = load_fashion_vit()
    if not class_token:
        config = json.loads((ASSET_DIR / "config.json").read_text())["model"]
        gap = build_vit({**config, "class_token": False, "global_pool": "avg", "fc_norm": False})
        state = {k: v for k, v in model.state_dict().items() if k != "cls_token"}
        state["pos_embed"] = state["pos_embed"][:, 1:]  # the class token's position dropped
        gap.load_state_dict(state)
        model = gap
    model.reset_classifier(10, global_pool="avg")  # keeps the final norm before the mean (fc_norm stays Identity)
    return model


def fine_tune(model, images, labels, epochs: int, batch_size: int = 128, lr: float = 5e-4) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(0)
    losses, step, start = [], 0, time.time()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for i in range(len(images) // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(augment(normalize(images[idx]), gen)), labels[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                losses.append(round(float(loss), 4))
                print(f"step {step}/{steps} loss {float(loss):.3f} {time.time() - start:.0f}s", flush=True)
    return losses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--r", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--weights", default="results/vision_gap_vit.pt")
    ap.add_argument("--no-class-token", action="store_true", help="the reference rebuilt without its class token")
    ap.add_argument("--out", default="results/vision_gap_pooling.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = gap_model(class_token=not args.no_class_token)
    (train_x, train_y), (held_x, held_y) = split_train_heldout()
    losses = None
    if Path(args.weights).exists():
        model.load_state_dict(torch.load(args.weights))
    else:
        losses = fine_tune(model, train_x, train_y, args.epochs)
        torch.save(model.state_dict(), args.weights)
    model.eval()
    test_x, test_y = load_fashion_mnist("test")
    result = {"command": " ".join(["python", "benchmarks/exploration/vision_gap_pooling.py", *sys.argv[1:]]),
              "epochs": args.epochs, "loss_every_50_steps": losses, "splits": {}}
    with torch.inference_mode():
        for split, (x, y) in {"heldout": (held_x, held_y), "test": (test_x, test_y)}.items():
            base = correct_per_image(model, x, y).float().tolist()
            entry = {"images": len(base), "unpatched": 100 * sum(base) / len(base), "rows": []}
            print(split, "unpatched", entry["unpatched"], flush=True)
            for r in args.r:
                for method in ("tome", "quickmerge"):
                    hits = {}
                    for weighted in (True, False):
                        with patch(model, r=r, method=method, size_weighted_pool=weighted):
                            hits[weighted] = correct_per_image(model, x, y).float().tolist()
                    row = {"r": r, "method": method,
                           "weighted": 100 * sum(hits[True]) / len(base), "plain": 100 * sum(hits[False]) / len(base),
                           "weighted_minus_plain_pt": [round(100 * v, 3)
                                                       for v in bootstrap_difference(hits[True], hits[False])],
                           "weighted_minus_unpatched_pt": [round(100 * v, 3)
                                                           for v in bootstrap_difference(hits[True], base)],
                           "plain_minus_unpatched_pt": [round(100 * v, 3)
                                                        for v in bootstrap_difference(hits[False], base)]}
                    entry["rows"].append(row)
                    print(split, row, flush=True)
            result["splits"][split] = entry
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
