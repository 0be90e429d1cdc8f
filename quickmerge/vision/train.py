"""Train the reference Fashion-MNIST ViT (``quickmerge train vision``).

55,000 training images (the last 5,000 of the training split are held out for choosing
merging settings, never the test set), AdamW with warm-up and cosine decay, label
smoothing, random flips and 2-pixel shifts, bf16 autocast on CPU where supported.
Writes ``model.safetensors``, ``config.json`` (model config, data checksums, held-out and
test accuracy) and ``train_log.json`` (loss per 100 steps, accuracy per epoch).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._optional import require
from ..data.fashion_mnist import checksums, load_fashion_mnist, normalize
from ..pretrained.fashion_vit import ASSET_DIR, DEFAULT_CONFIG, build_vit

HELD_OUT = 5_000


def split_train_heldout() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train images, labels) and (held-out images, labels): the last 5,000 training images are held out."""
    images, labels = load_fashion_mnist("train")
    return (images[:-HELD_OUT], labels[:-HELD_OUT]), (images[-HELD_OUT:], labels[-HELD_OUT:])


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels, ``[B, 1, 28, 28]`` float."""
    b = images.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (2, 2, 2, 2), value=float(images.min()))
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()  # one shift per batch: cheap
    return padded[..., dy : dy + 28, dx : dx + 28]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on uint8 ``images [N, 1, 28, 28]``."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(normalize(images[i : i + batch_size]))
        correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    return correct / len(images)


def train(
    out_dir: str | Path = ASSET_DIR,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_steps: int = 300,
    seed: int = 0,
    bf16: bool = True,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train, evaluate and save the reference ViT; returns the summary written to config.json."""
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"epochs and batch_size must be >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    st = require("safetensors.torch", "vision", "Saving the reference ViT")
    tqdm = require("tqdm", "progress", "The training progress bar").tqdm
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config or DEFAULT_CONFIG)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (tr_x, tr_y), (ho_x, ho_y) = split_train_heldout()
    model = build_vit(config)
    def decays(name: str, p: torch.Tensor) -> bool:  # weight matrices only; not norms, biases, embeddings
        return p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name

    groups = [
        {"params": [p for n, p in model.named_parameters() if decays(n, p)], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if not decays(n, p)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=lr)
    steps_per_epoch = len(tr_x) // batch_size
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    log: dict[str, Any] = {"loss_per_100_steps": [], "epochs": []}
    start, step, running = time.perf_counter(), 0, 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(tr_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", unit="step")
        for i in bar:
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = augment(normalize(tr_x[idx]), gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), tr_y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running += float(loss)
            if step % 100 == 0:
                log["loss_per_100_steps"].append(round(running / 100, 4))
                bar.set_postfix(loss=f"{running / 100:.3f}")
                running = 0.0
        held = accuracy(model, ho_x, ho_y)
        seconds = round(time.perf_counter() - start, 1)
        log["epochs"].append({"epoch": epoch + 1, "heldout_accuracy": held, "seconds": seconds})
        print(f"epoch {epoch + 1}: held-out accuracy {held:.4f}")
    te_x, te_y = load_fashion_mnist("test")
    summary = {
        "model": config,
        "architecture": "timm.models.vision_transformer.VisionTransformer",
        "training": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                     "warmup_steps": warmup_steps, "seed": seed, "bf16_autocast": bf16,
                     "train_images": len(tr_x), "heldout_images": len(ho_x),
                     "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 1),
                     "torch": torch.__version__},
        "data_sha256": checksums(),
        "heldout_accuracy": accuracy(model, ho_x, ho_y),
        "test_accuracy": accuracy(model, te_x, te_y),
    }
    st.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"test accuracy {summary['test_accuracy']:.4f}; saved to {out}")
    return summary
