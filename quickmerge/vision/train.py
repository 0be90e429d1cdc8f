"""Train the reference Fashion-MNIST ViT (``quickmerge train vision``).

55,000 training images (the last 5,000 of the training split are held out for choosing
merging settings, never the test set); AdamW with warm-up and cosine decay, label
smoothing, random flips and per-image shifts of up to 2 pixels, an exponential moving
average of the weights (EMA), and DeiT-style distillation from a small CNN teacher trained
first on the same images (it is not shipped). The defaults are the shipped model's recipe
(16 epochs, a 10-epoch teacher): about 2.5 minutes on one GPU, several hours on 2 CPU cores
(``checkpoint.pt`` makes it resumable). Writes ``model.safetensors``,
``config.json`` (model config, data checksums, recipe, held-out and test accuracy) and
``train_log.json`` (loss per 100 steps, accuracy per epoch) to ``out_dir`` (default
``results/fashion_vit``: the shipped checkpoint is only replaced when asked,
``--out quickmerge/assets/fashion_vit``).

Runs unchanged under ``torchrun`` / ``accelerate launch``: every rank draws the same global
batch and trains on its slice, ``DistributedDataParallel`` averages the gradients, so the
update is the one of the global batch. A ``checkpoint.pt`` written after every epoch lets
the same command resume after a kill (``--fresh`` starts over).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._cache import write_text_atomic
from .._optional import require
from ..data.fashion_mnist import checksums, load_fashion_mnist, normalize
from ..distributed import Context
from ..pretrained.fashion_vit import DEFAULT_CONFIG, build_vit
from ..training_state import load_training_state, save_training_state
from .patch import MATCHING_DEFAULTS, default_saliency_rule
from .token_merge import SALIENCY_RULES, SIMILARITIES
from .token_scorer import ATTRIBUTE as SCORER_ATTRIBUTE
from .token_scorer import TokenScorer

HELD_OUT = 5_000
DEFAULT_OUT = Path("results") / "fashion_vit"


@dataclass
class Recipe:
    """How to train. ``batch_size`` is the global batch (split over the ranks)."""

    epochs: int = 16  # the shipped model's schedule (about 2 minutes on one H200; hours on 2 CPU cores)
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 300
    label_smoothing: float = 0.1
    ema_decay: float = 0.998  # 0: no EMA
    max_shift: int = 2
    teacher_epochs: int = 10  # 0: no distillation
    distill_weight: float = 0.5  # share of the loss that matches the teacher's predictions
    bf16: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.ema_decay < 1
                or self.teacher_epochs < 0):
            raise ValueError("epochs and batch_size must be >= 1, lr > 0, ema_decay in [0, 1) and teacher_epochs "
                             f">= 0, got {self}")


@dataclass
class FineTune:
    """Merge-aware fine-tuning (``--finetune``): start from a trained checkpoint, merge inside every block.

    ``method``: "quickmerge" trains through the differentiable merge (Gumbel noise and relaxed
    K-hot removal mask, temperature annealed geometrically from ``temperature_start`` to
    ``temperature_end``; hard merges at evaluation); "tome" through ToMe's hard matching
    (gradients through the weighted means only, as ToMe's paper trains). ``r`` tokens merged per
    block, or ``ratio`` of the patch tokens left after the last block. ``self_distill``: share of
    the loss that matches the predictions of the starting checkpoint run without merging (a frozen
    copy; KL divergence on the same augmented images), the rest label-smoothed cross-entropy; 0:
    labels only. ``learned_saliency`` (quickmerge only): also learn a keep score per block
    (:class:`~quickmerge.vision.token_scorer.TokenScorer`, zero at the start), saved beside the
    model as ``token_scorer.safetensors``; it learns at ``scorer_lr_scale`` times the learning rate.
    ``similarity`` and ``saliency_rule`` (quickmerge only): what the matching compares and how saliency enters
    it, as :func:`~quickmerge.vision.patch.patch`'s (None: its defaults, filled in here so the checkpoint's config
    records them; the saliency weight is the rule's default).
    """

    checkpoint: str
    method: str = "quickmerge"
    r: int | None = None
    ratio: float | None = None
    temperature_start: float = 1.0
    temperature_end: float = 0.05
    self_distill: float = 0.0
    learned_saliency: bool = False
    scorer_lr_scale: float = 1.0
    similarity: str | None = None
    saliency_rule: str | None = None

    def __post_init__(self) -> None:
        if self.method not in ("quickmerge", "tome"):
            raise ValueError(f"finetune method must be 'quickmerge' or 'tome', got {self.method!r}")
        if (self.similarity, self.saliency_rule) != (None, None) and self.method != "quickmerge":
            raise ValueError(f"similarity and saliency_rule are QuickMerge++'s settings; method {self.method!r} "
                             "matches keys by ToMe's rule")
        if self.method == "quickmerge":
            if self.similarity is None:
                self.similarity = MATCHING_DEFAULTS["similarity"]
            if self.saliency_rule is None:
                self.saliency_rule = default_saliency_rule(self.learned_saliency)
            if self.similarity not in SIMILARITIES or self.saliency_rule not in SALIENCY_RULES:
                raise ValueError(f"similarity must be one of {SIMILARITIES} and saliency_rule one of "
                                 f"{SALIENCY_RULES}, got {self.similarity!r}, {self.saliency_rule!r}")
        if self.learned_saliency and self.saliency_rule not in (None, "additive"):
            raise ValueError("a learned saliency is trained with the additive rule, not saliency_rule "
                             f"{self.saliency_rule!r}")
        if not 0 < self.scorer_lr_scale < math.inf:
            raise ValueError(f"scorer_lr_scale must be a finite number > 0, got {self.scorer_lr_scale}")
        if self.scorer_lr_scale != 1.0 and not self.learned_saliency:
            raise ValueError("scorer_lr_scale applies to a learned saliency only (learned_saliency=True)")
        if self.learned_saliency and self.method != "quickmerge":
            raise ValueError(f"a learned saliency needs method 'quickmerge', got {self.method!r}")
        if not 0.0 <= self.self_distill <= 1.0:
            raise ValueError(f"self_distill must lie in [0, 1], got {self.self_distill}")
        if (self.r is None) == (self.ratio is None):
            raise ValueError(f"give exactly one of r and ratio for merge-aware fine-tuning, got r={self.r}, "
                             f"ratio={self.ratio}")
        if not 0 < self.temperature_end <= self.temperature_start:
            raise ValueError("need 0 < temperature_end <= temperature_start, got "
                             f"{self.temperature_end}, {self.temperature_start}")

    def temperature(self, step: int, total: int) -> float:
        """Geometric annealing from ``temperature_start`` (step 0) to ``temperature_end`` (last step)."""
        share = min(1.0, step / max(1, total - 1))
        return self.temperature_start * (self.temperature_end / self.temperature_start) ** share

    def patch(self, model: nn.Module, *, train: bool) -> Any:
        """Patch ``model`` with this merging (the differentiable path only for the trained copy)."""
        from .patch import patch

        scorer = TokenScorer(len(model.blocks), model.embed_dim) if self.learned_saliency else None
        options = {"similarity": self.similarity, "saliency_rule": self.saliency_rule} \
            if self.method == "quickmerge" else {}
        handle = patch(model, r=self.r or 0, method=self.method, scorer=scorer,
                       temperature=self.temperature_start if train and self.method == "quickmerge" else None,
                       **options)
        if self.ratio is not None:
            handle.ratio = self.ratio
        return handle


def split_train_heldout() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train images, labels) and (held-out images, labels): the last 5,000 training images are held out."""
    images, labels = load_fashion_mnist("train")
    return (images[:-HELD_OUT], labels[:-HELD_OUT]), (images[-HELD_OUT:], labels[-HELD_OUT:])


def augment(images: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random horizontal flips and per-image shifts of up to ``max_shift`` pixels, ``[B, 1, H, W]`` float."""
    b, _, h, w = images.shape
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    if max_shift == 0:
        return images
    s = max_shift
    padded = F.pad(images, (s, s, s, s), value=float(images.min()))
    dy, dx = torch.randint(0, 2 * s + 1, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None].expand(b, h, w)
    cols = (dx[:, None] + torch.arange(w))[:, None, :].expand(b, h, w)
    return padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]


@torch.no_grad()
def correct_per_image(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 500) -> torch.Tensor:
    """``[N]`` bool: whether ``model``'s top-1 is right on each uint8 image of ``images [N, 1, 28, 28]``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hits = [model(normalize(images[i : i + batch_size].to(device))).argmax(-1) == labels[i : i + batch_size].to(device)
            for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(hits).cpu()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` on uint8 ``images [N, 1, 28, 28]``."""
    return correct_per_image(model, images, labels, batch_size).double().mean().item()


def cnn_teacher() -> nn.Module:
    """A small CNN (four 3x3 convolutions, two poolings), about 90% on Fashion-MNIST after two epochs."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 10),
    )


def train_teacher(
    images: torch.Tensor, labels: torch.Tensor, epochs: int, *, seed: int, batch_size: int = 128, progress: bool = True,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train :func:`cnn_teacher` on uint8 ``images`` (one-cycle schedule) on ``device``; returns it in eval mode.

    Deterministic for a seed on the CPU; a distributed run trains it on rank 0 and shares the weights.
    """
    tqdm = require("tqdm", "progress", "The training progress bar").tqdm
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    teacher = cnn_teacher().to(device)
    opt = torch.optim.AdamW(teacher.parameters(), 2e-3, weight_decay=1e-4)
    steps = len(images) // batch_size
    if steps == 0:
        raise ValueError(f"the teacher needs at least one batch of {batch_size} images, got {len(images)}")
    for epoch in range(epochs):
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
        order = torch.randperm(len(images), generator=gen)
        teacher.train()
        for i in tqdm(range(steps), desc=f"teacher {epoch + 1}/{epochs}", unit="step", disable=not progress):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = augment(normalize(images[idx]), gen).to(device)
            loss = F.cross_entropy(teacher(x), labels[idx].to(device), label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return teacher.eval()


def _param_groups(model: nn.Module, weight_decay: float, lr: float, scorer_lr: float) -> list[dict[str, Any]]:
    def decays(name: str, p: torch.Tensor) -> bool:  # weight matrices only; not norms, biases, embeddings
        return p.ndim >= 2 and "pos_embed" not in name and "cls_token" not in name and "reg_token" not in name

    named = [(n, p) for n, p in model.named_parameters() if not n.startswith(f"{SCORER_ATTRIBUTE}.")]
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0, "lr": lr},
    ]
    scorer = getattr(model, SCORER_ATTRIBUTE, None)  # a learned saliency, patched in by the fine-tune
    if scorer is not None:
        groups.append({"params": list(scorer.parameters()), "weight_decay": 0.0, "lr": scorer_lr})
    return groups


def train(
    out_dir: str | Path = DEFAULT_OUT,
    *,
    recipe: Recipe | None = None,
    config: dict[str, Any] | None = None,
    ctx: Context | None = None,
    fresh: bool = False,
    data: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    finetune: FineTune | None = None,
    init: str | Path | None = None,
) -> dict[str, Any] | None:
    """Train, evaluate and save the reference ViT; returns the summary written to config.json (rank 0).

    ``data`` ((train x, y), (held-out x, y)) and ``test`` default to Fashion-MNIST's splits.
    ``finetune``: fine-tune a trained checkpoint with merging in every block instead (its
    accuracies are then those of the merged model; the CNN teacher is not used, the unmerged
    checkpoint itself is with ``finetune.self_distill``).
    ``init``: start from the weights of a trained checkpoint directory (a second schedule,
    "warm restart", on a model that has not converged), with its model config.
    """
    recipe = recipe or Recipe()
    ctx = ctx or Context()
    if recipe.batch_size % ctx.world:
        raise ValueError(f"batch_size ({recipe.batch_size}) must be divisible by the number of processes ({ctx.world})")
    st = require("safetensors.torch", "vision", "Saving the reference ViT")
    tqdm = require("tqdm", "progress", "The training progress bar").tqdm
    out = Path(out_dir)
    config = dict(config or DEFAULT_CONFIG)
    torch.manual_seed(recipe.seed)
    if finetune is not None and recipe.teacher_epochs:
        raise ValueError("merge-aware fine-tuning uses no teacher: set teacher_epochs=0")
    start_from = finetune.checkpoint if finetune is not None else init
    if start_from is not None:  # loaded first: a wrong path is reported before the data is read
        from ..pretrained.fashion_vit import load_fashion_vit

        model = load_fashion_vit(start_from).train().to(ctx.device)
        config = json.loads((Path(start_from) / "config.json").read_text())["model"]
    else:
        model = build_vit(config).to(ctx.device)
    (tr_x, tr_y), (ho_x, ho_y) = data if data is not None else split_train_heldout()
    ema = copy.deepcopy(model).requires_grad_(False) if recipe.ema_decay else None
    # the unmerged starting model, frozen: what merge-aware fine-tuning distils from (self_distill > 0)
    self_teacher = (copy.deepcopy(model).eval().requires_grad_(False)
                    if finetune is not None and finetune.self_distill else None)
    handle = finetune.patch(model, train=True) if finetune is not None else None
    if finetune is not None and ema is not None:
        finetune.patch(ema, train=False)
    scorer_lr = recipe.lr * (finetune.scorer_lr_scale if finetune is not None else 1.0)
    opt = torch.optim.AdamW(_param_groups(model, recipe.weight_decay, recipe.lr, scorer_lr), lr=recipe.lr)
    steps_per_epoch = len(tr_x) // recipe.batch_size
    total = recipe.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / recipe.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))
    )
    gen = torch.Generator().manual_seed(recipe.seed)
    log: dict[str, Any] = {"loss_per_100_steps": [], "epochs": []}
    checkpoint = out / "checkpoint.pt"
    identity = {"recipe": asdict(recipe), "model": config, "train_images": len(tr_x)}
    if finetune is not None:
        identity["finetune"] = asdict(finetune)
    if init is not None:
        identity["init"] = str(init)
    start_epoch, elapsed = 0, 0.0
    parts = {"model": model, "ema": ema, "opt": opt, "sched": sched, "gen": gen}
    state = None if fresh else load_training_state(checkpoint, identity, parts, ctx.device)
    if state is not None:
        start_epoch, log, elapsed = state["epoch"], state["log"], state["elapsed"]
        if ctx.main:
            print(f"resuming {out} after epoch {start_epoch}")
    teacher = None
    if recipe.teacher_epochs:
        if start_epoch and state.get("teacher") is not None:
            teacher = cnn_teacher().to(ctx.device).eval()
            teacher.load_state_dict(state["teacher"])
        else:  # rank 0 trains it and shares its weights: GPU kernels need not repeat bit for bit across ranks
            teacher = (train_teacher(tr_x, tr_y, recipe.teacher_epochs, seed=recipe.seed, device=ctx.device)
                       if ctx.main else cnn_teacher().to(ctx.device).eval())
            if ctx.world > 1:
                weights = {k: v.cpu() for k, v in teacher.state_dict().items()} if ctx.main else None
                teacher.load_state_dict(ctx.broadcast(weights))
        log["teacher_heldout_accuracy"] = accuracy(teacher, ho_x, ho_y)
        if ctx.main:
            print(f"teacher: held-out accuracy {log['teacher_heldout_accuracy']:.4f}")
    # what the loss distils from: the unmerged starting model when fine-tuning, else the CNN teacher (or nothing)
    distiller, distill_weight = ((self_teacher, finetune.self_distill) if self_teacher is not None
                                 else (teacher, recipe.distill_weight))
    net = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    started, running = time.perf_counter() - elapsed, 0.0
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        order = torch.randperm(len(tr_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="step", disable=not ctx.main)
        for i in bar:
            idx = order[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            if handle is not None and handle.temperature is not None:
                handle.temperature = finetune.temperature(epoch * steps_per_epoch + i, total)
            x = augment(normalize(tr_x[idx]), gen, recipe.max_shift)[ctx.rank :: ctx.world].to(ctx.device)
            y = tr_y[idx][ctx.rank :: ctx.world].to(ctx.device)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
                logits = net(x)
                loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
                if distiller is not None:
                    with torch.no_grad():
                        target = distiller(x).log_softmax(-1)
                    distill = F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
                    loss = (1 - distill_weight) * loss + distill_weight * distill
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - recipe.ema_decay)
            running += loss.detach()  # a tensor: no device sync per step
            step = epoch * steps_per_epoch + i + 1
            if step % 100 == 0:
                log["loss_per_100_steps"].append(round(float(running) / 100, 4))
                bar.set_postfix(loss=f"{float(running) / 100:.3f}")
                running = 0.0
        record = {"epoch": epoch + 1, "heldout_accuracy": accuracy(model, ho_x, ho_y),
                  "seconds": round(time.perf_counter() - started, 1)}
        if ema is not None:
            record["heldout_accuracy_ema"] = accuracy(ema, ho_x, ho_y)
        log["epochs"].append(record)
        if ctx.main:
            print(f"epoch {epoch + 1}: " + ", ".join(f"{k} {v}" for k, v in record.items() if k != "epoch"))
            save_training_state(checkpoint, identity, {**parts, "teacher": teacher}, epoch=epoch + 1, log=log,
                                elapsed=time.perf_counter() - started)
        ctx.barrier()
    if not ctx.main:
        return None
    # Ship the EMA weights when they are better on the held-out images (never the test set).
    last = log["epochs"][-1]  # the held-out accuracies of the final weights, measured after the last epoch
    use_ema = ema is not None and last["heldout_accuracy_ema"] >= last["heldout_accuracy"]
    final = ema if use_ema else model
    te_x, te_y = test if test is not None else load_fashion_mnist("test")
    summary = {
        "model": config,
        "architecture": "timm.models.vision_transformer.VisionTransformer",
        "finetune": asdict(finetune) if finetune is not None else None,
        "init": None if init is None else {"from": str(init), **{
            k: json.loads((Path(init) / "config.json").read_text()).get(k) for k in ("training", "test_accuracy")}},
        "training": {**asdict(recipe), "train_images": len(tr_x), "heldout_images": len(ho_x),
                     "processes": ctx.world, "threads": torch.get_num_threads(), "weights": "ema" if use_ema else "raw",
                     "seconds": round(time.perf_counter() - started, 1), "torch": torch.__version__,
                     "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"},
        "data_sha256": checksums() if data is None else None,
        "heldout_accuracy": last["heldout_accuracy_ema" if use_ema else "heldout_accuracy"],
        "test_accuracy": accuracy(final, te_x, te_y),
    }
    out.mkdir(parents=True, exist_ok=True)
    scorer = getattr(final, SCORER_ATTRIBUTE, None)  # saved apart: the model file stays a plain ViT
    state_dict = {k: v.detach().contiguous().cpu() for k, v in final.state_dict().items()
                  if not k.startswith(f"{SCORER_ATTRIBUTE}.")}
    st.save_file(state_dict, str(out / "model.safetensors"))
    if scorer is not None:
        scorer.save(out)
    write_text_atomic(out / "config.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "train_log.json", json.dumps(log, indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    print(f"test accuracy {summary['test_accuracy']:.4f}; saved to {out}")
    return summary
