"""Train the autoregressive image and video models (``quickmerge train ar-image`` / ``ar-video``).

1. Fit the tokenizer: k-means over patches of training pixels (deterministic for a seed).
2. Tokenise the training pixels once.
3. Train a small Llama on random training sequences (next-token cross-entropy) with AdamW,
   warm-up and cosine decay; video batches draw half their windows from the real clips and
   half from Moving Fashion-MNIST.
4. Save model, tokenizer, format, data checksums and the training log; report held-out
   bits per token (images: held-out training images; video: held-out frames and sequences).
   The test images and held-out windows used by ``quickmerge eval`` are never trained on.

Runs unchanged under ``torchrun`` / ``accelerate launch`` (every rank draws the same global
batch and trains on its slice, DistributedDataParallel averages the gradients); a
``checkpoint.pt`` every ``save_every`` steps lets the same command resume after a kill.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._cache import write_text_atomic
from .._optional import require
from ..distributed import Context
from ..training_state import load_training_state, save_training_state
from .formats import FORMATS, SequenceFormat, to_sequences
from .model import SIZES, build_ar_model, save_ar_model
from .tokenizer import PatchCodebook

DEFAULT_OUT = {"image": Path("results") / "ar_image", "video": Path("results") / "ar_video"}


@dataclass
class ARRecipe:
    """How to train; ``batch_size`` is the global batch of sequences (split over the ranks)."""

    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    save_every: int = 100
    heldout_sequences: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.save_every < 1:
            raise ValueError(f"steps, batch_size and save_every must be >= 1 and lr > 0, got {self}")


class TokenData:
    """Training and held-out token sequences of one modality, sampled by a generator.

    ``sources``: lists of token tensors ``[N, length]`` (images) or per-frame tokens
    ``[F, tokens_per_frame]`` (video clips) from which windows are cut; a batch draws each
    sequence from a source chosen uniformly, then a position uniformly within it.
    """

    def __init__(self, fmt: SequenceFormat, sources: list[list[Tensor]], heldout: Tensor) -> None:
        self.fmt, self.sources, self.heldout = fmt, sources, heldout

    def sample(self, count: int, gen: torch.Generator) -> Tensor:
        """``[count, fmt.length]`` int64 training sequences, BOS first."""
        fmt = self.fmt
        out = []
        for s in torch.randint(len(self.sources), (count,), generator=gen).tolist():
            clips = self.sources[s]
            if fmt.frames == 1:
                pool = clips[0]
                out.append(pool[int(torch.randint(len(pool), (1,), generator=gen))])
                continue
            sizes = torch.tensor([len(c) - fmt.frames + 1 for c in clips], dtype=torch.float)
            c = int(torch.multinomial(sizes, 1, generator=gen))
            start = int(torch.randint(int(sizes[c]), (1,), generator=gen))
            frames = clips[c][start : start + fmt.frames].reshape(-1)
            out.append(torch.cat([torch.tensor([fmt.bos]), frames]))
        return torch.stack(out).long()


def build_data(fmt: SequenceFormat, recipe: ARRecipe) -> tuple[PatchCodebook, TokenData, dict]:
    """Fit the tokenizer and tokenise the training pixels; returns (tokenizer, data, data checksums)."""
    from ..data.fashion_mnist import checksums as fashion_checksums
    from .data import image_pixels, video_clips

    if fmt.frames == 1:
        train = image_pixels("train")
        tokenizer = PatchCodebook.fit(train, fmt.codes, fmt.patch, seed=recipe.seed)
        sequences = to_sequences(train, fmt, tokenizer).short()
        heldout = heldout_sequences(fmt, tokenizer, recipe.heldout_sequences)
        return tokenizer, TokenData(fmt, [[sequences]], heldout), fashion_checksums()
    from ..data.video import checksums as clip_checksums

    clips = video_clips("train", fmt)
    pixels = torch.cat([c.frames for c in clips])
    tokenizer = PatchCodebook.fit(pixels, fmt.codes, fmt.patch, seed=recipe.seed)

    def frame_tokens(frames: Tensor) -> Tensor:
        return tokenizer.encode(frames).short()  # [F, tokens_per_frame]

    real = [frame_tokens(c.frames) for c in clips if not c.name.startswith("moving-fashion")]
    moving = [frame_tokens(c.frames) for c in clips if c.name.startswith("moving-fashion")]
    heldout = heldout_sequences(fmt, tokenizer, recipe.heldout_sequences)
    return tokenizer, TokenData(fmt, [real, moving], heldout), {**fashion_checksums(), **clip_checksums()}


def heldout_sequences(fmt: SequenceFormat, tokenizer: PatchCodebook, count: int) -> Tensor:
    """``[count, fmt.length]`` held-out sequences the training log's bits are measured on.

    Images: the first ``count`` held-out training images; video: ``count`` windows spread evenly
    over the held-out frames and sequences.
    """
    from .data import image_pixels, video_clips, video_windows

    if fmt.frames == 1:
        return to_sequences(image_pixels("heldout")[:count], fmt, tokenizer)
    windows, _ = video_windows(video_clips("heldout", fmt), fmt)
    pick = torch.linspace(0, len(windows) - 1, count).round().long()
    return to_sequences(windows[pick], fmt, tokenizer)


@torch.no_grad()
def bits_per_token(model: Any, sequences: Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy in bits over ``sequences [N, L]`` (every position after BOS)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in sequences.split(batch_size):
        out = model(input_ids=batch, labels=batch)
        n = batch.numel() - len(batch)
        total += float(out.loss) * n
        count += n
    model.train(was)
    return total / count / math.log(2)


def train_ar(
    modality: str,
    out_dir: str | Path | None = None,
    *,
    recipe: ARRecipe | None = None,
    sizes: dict[str, int] | None = None,
    ctx: Context | None = None,
    fresh: bool = False,
    data: tuple[PatchCodebook, TokenData, dict] | None = None,
) -> dict[str, Any] | None:
    """Train and save the ``modality`` ("image" or "video") model; returns its summary on rank 0.

    ``data``: (tokenizer, token data, data checksums) instead of the real pixels (tests).
    """
    if modality not in FORMATS:
        raise ValueError(f"modality must be one of {sorted(FORMATS)}, got {modality!r}")
    fmt = data[1].fmt if data is not None else FORMATS[modality]
    recipe = recipe or ARRecipe()
    ctx = ctx or Context()
    if recipe.batch_size % ctx.world:
        raise ValueError(f"batch_size ({recipe.batch_size}) must be divisible by the number of processes ({ctx.world})")
    tqdm = require("tqdm", "progress", "The training progress bar").tqdm
    out = Path(out_dir or DEFAULT_OUT[modality])
    started = time.perf_counter()
    tokenizer, tokens, checks = data if data is not None else build_data(fmt, recipe)
    setup = time.perf_counter() - started  # tokenizer fit and tokenisation
    torch.manual_seed(recipe.seed)
    model = build_ar_model(fmt, **(sizes or {})).to(ctx.device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / recipe.warmup_steps)
                                              * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / recipe.steps)))))
    gen = torch.Generator().manual_seed(recipe.seed)
    identity = {"modality": modality, "recipe": asdict(recipe), "sizes": sizes or {}, "format": fmt.to_dict()}
    log: dict[str, Any] = {"loss_per_25_steps": [], "heldout_bits_per_token": []}
    step, elapsed = 0, 0.0
    checkpoint = out / "checkpoint.pt"
    parts = {"model": model, "opt": opt, "sched": sched, "gen": gen}
    state = None if fresh else load_training_state(checkpoint, identity, parts, ctx.device)
    if state is not None:
        step, log, elapsed = state["step"], state["log"], state["elapsed"]
        if ctx.main:
            print(f"resuming {out} at step {step}")
    net = model
    if ctx.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
    clock = time.perf_counter() - elapsed
    bar = tqdm(total=recipe.steps, initial=step, desc=f"train ar-{modality}", unit="step", disable=not ctx.main)
    running = 0.0
    while step < recipe.steps:
        batch = tokens.sample(recipe.batch_size, gen)[ctx.rank :: ctx.world].to(ctx.device)
        loss = net(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        running += float(loss.detach())
        bar.update(1)
        if step % 25 == 0:
            log["loss_per_25_steps"].append(round(running / 25, 4))
            bar.set_postfix(loss=f"{running / 25:.3f}")
            running = 0.0
        if step % recipe.save_every == 0 or step == recipe.steps:
            bits = bits_per_token(model, tokens.heldout.to(ctx.device))
            log["heldout_bits_per_token"].append([step, round(bits, 4)])
            if ctx.main:
                save_training_state(checkpoint, identity, parts, step=step, log=log,
                                    elapsed=time.perf_counter() - clock)
            ctx.barrier()
    bar.close()
    if not ctx.main:
        return None
    summary = {
        "modality": modality, "format": fmt.to_dict(), "sizes": {k: getattr(model.config, k) for k in SIZES},
        "parameters": sum(p.numel() for p in model.parameters()),
        "recipe": asdict(recipe), "processes": ctx.world, "threads": torch.get_num_threads(),
        "training_seconds": round(time.perf_counter() - clock, 1), "setup_seconds": round(setup, 1),
        "torch": torch.__version__, "data_sha256": checks,
        "heldout_bits_per_token": log["heldout_bits_per_token"][-1][1],
    }
    save_ar_model(model, tokenizer, fmt, out)
    write_text_atomic(out / "training.json", json.dumps({**summary, "log": log}, indent=2) + "\n")
    checkpoint.unlink(missing_ok=True)
    print(f"held-out {summary['heldout_bits_per_token']:.4f} bits per token; saved to {out}")
    return summary
