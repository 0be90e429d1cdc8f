"""Pixels the autoregressive models train and are evaluated on (all real, all offline).

Images: Fashion-MNIST; training on the first 55,000 training images (as the reference
ViT), held-out examples from the 10,000 test images.

Video: the two training clips of Debian's ``opencv-doc`` (first 80% of their frames for
training, the last 20% held out) and Moving Fashion-MNIST (training sequences move
training-split items, held-out sequences move test-split items, with another seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.fashion_mnist import load_fashion_mnist
from ..data.moving_fashion import moving_fashion_mnist
from ..data.video import read_clip, training_clip_paths
from .formats import VIDEO, SequenceFormat, windows

TRAIN_SHARE = 0.8  # of each clip's frames
MOVING_FRAMES = 20
MOVING_TRAIN, MOVING_HELDOUT = 1500, 200  # sequences
HELD_OUT_IMAGES = 5_000  # the ViT's held-out training images, also kept out of the image model


@dataclass
class Clip:
    """A named grey video ``frames [F, H, W]`` uint8."""

    name: str
    frames: Tensor


def image_pixels(split: str) -> Tensor:
    """Fashion-MNIST images ``[N, 28, 28]`` uint8: "train" (first 55,000 of the training split),
    "heldout" (its last 5,000: training curves), "test" (10,000: evaluation only)."""
    if split not in ("train", "heldout", "test"):
        raise ValueError(f"split must be 'train', 'heldout' or 'test', got {split!r}")
    images, _ = load_fashion_mnist("test" if split == "test" else "train")
    images = images[:, 0]
    if split == "test":
        return images
    return images[:-HELD_OUT_IMAGES] if split == "train" else images[-HELD_OUT_IMAGES:]


def video_clips(split: str, fmt: SequenceFormat = VIDEO) -> list[Clip]:
    """The clips of ``split`` ("train" or "heldout"): opencv-doc's training clips, then Moving Fashion-MNIST."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    clips = []
    for path in training_clip_paths():
        frames = read_clip(path, fmt.height)
        cut = int(len(frames) * TRAIN_SHARE)
        clips.append(Clip(path.name, frames[:cut] if split == "train" else frames[cut:]))
    items, _ = load_fashion_mnist("train" if split == "train" else "test")
    count = MOVING_TRAIN if split == "train" else MOVING_HELDOUT
    seed = 0 if split == "train" else 1
    moving = moving_fashion_mnist(items, count, frames=MOVING_FRAMES, canvas=fmt.height, seed=seed)
    clips += [Clip(f"moving-fashion-{i}", seq) for i, seq in enumerate(moving)]
    return clips


def video_windows(
    clips: list[Clip], fmt: SequenceFormat = VIDEO, *, step: int | None = None
) -> tuple[Tensor, list[str]]:
    """Every window of ``fmt.frames`` frames (start every ``step``, default: non-overlapping) and its name."""
    step = step or fmt.frames
    parts, names = [], []
    for clip in clips:
        w = windows(clip.frames, fmt.frames, step)
        parts.append(w)
        names += [f"{clip.name}@{i * step}" for i in range(len(w))]
    return torch.cat(parts), names


def interleave_sources(names: list[str], count: int) -> list[int]:
    """Indices of ``count`` windows taken in turn from each source clip family (real clips, Moving Fashion-MNIST).

    Real clips first and alternately, so a small ``count`` holds both kinds of video.
    """
    real = [i for i, n in enumerate(names) if not n.startswith("moving-fashion")]
    moving = [i for i, n in enumerate(names) if n.startswith("moving-fashion")]
    by_clip: dict[str, list[int]] = {}
    for i in real:
        by_clip.setdefault(names[i].split("@")[0], []).append(i)
    queues = [*by_clip.values(), moving]
    order: list[int] = []
    while len(order) < count and any(queues):
        for q in queues:
            if q and len(order) < count:
                order.append(q.pop(0))
    if len(order) < count:
        raise ValueError(f"only {len(order)} held-out windows exist, asked for {count}")
    return order
