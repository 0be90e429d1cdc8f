"""The training loop of the benchmarks that train their own model (``rope_vit.py``, ``siglip2_naflex.py``).

AdamW (weight decay 0.05), 200 warm-up steps then a cosine schedule, shuffled batches; the state is saved after
every epoch and an interrupted run resumes from the last one saved.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm


def train_epochs(model: torch.nn.Module, state_path: Path, *, samples: int, epochs: int, batch_size: int, lr: float,
                 seed: int, loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
                 clip_grad_norm: float | None = None) -> list[dict]:
    """Train ``model`` in place; returns the per-epoch log (mean loss, seconds).

    ``loss(indices, generator)``: the loss of the batch of those sample indices; ``generator`` (seeded per epoch,
    after it drew the epoch's order) is for the batch's augmentation."""
    steps_per_epoch = math.ceil(samples / batch_size)
    total, warmup = epochs * steps_per_epoch, 200
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    log, start = [], 0
    if state_path.exists():
        state = torch.load(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        log, start = state["log"], state["epoch"]
    for epoch in range(start, epochs):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(samples, generator=generator)
        model.train()
        began, losses = time.time(), []
        for i in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}"):
            value = loss(order[i * batch_size:(i + 1) * batch_size], generator)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(value.item())
        log.append({"epoch": epoch + 1, "mean_loss": sum(losses) / len(losses), "seconds": time.time() - began})
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "log": log, "epoch": epoch + 1}, state_path)
    return log
