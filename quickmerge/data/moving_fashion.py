"""Moving Fashion-MNIST: Fashion-MNIST items bouncing on a canvas, by the Moving-MNIST procedure.

Srivastava et al. (2015) made Moving MNIST by placing two 28x28 digits at random positions
of a 64x64 canvas, giving each a random direction at a fixed speed, letting them bounce off
the canvas edges, and combining overlapping items by the pixel-wise maximum. The same
procedure with Fashion-MNIST items instead of digits gives :func:`moving_fashion_mnist`.
A sequence is fully determined by ``(seed, index)``, so held-out sequences are never drawn
again by training and every run sees the same ones.
"""

from __future__ import annotations

import math

import torch


def moving_fashion_mnist(
    items: torch.Tensor,
    count: int,
    *,
    frames: int = 20,
    canvas: int = 64,
    per_sequence: int = 2,
    speed: float = 3.6,
    seed: int = 0,
    return_items: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``count`` sequences ``[count, frames, canvas, canvas]`` uint8 of moving items.

    ``items``: uint8 ``[N, 1, 28, 28]`` or ``[N, 28, 28]`` (e.g. a Fashion-MNIST split);
    each sequence draws ``per_sequence`` of them. ``speed``: pixels per frame (3.6 is the
    original's 0.1 of the free range of a 64-pixel canvas, 36 pixels). ``return_items``: also
    return which items each sequence drew, ``[count, per_sequence]`` indices into ``items`` (their
    labels make a classification set).
    """
    if items.dtype != torch.uint8 or items.shape[-2:] != (28, 28):
        raise ValueError(f"items must be uint8 [N, 28, 28] or [N, 1, 28, 28], got {items.dtype} {tuple(items.shape)}")
    if count < 1 or frames < 1 or per_sequence < 1:
        raise ValueError(f"count, frames and per_sequence must be >= 1, got {count}, {frames}, {per_sequence}")
    if canvas < 28:
        raise ValueError(f"canvas must be at least 28 pixels (an item's size), got {canvas}")
    items = items.reshape(-1, 28, 28)
    free = canvas - 28
    gen = torch.Generator().manual_seed(seed)
    which = torch.randint(0, len(items), (count, per_sequence), generator=gen)
    start = torch.rand(count, per_sequence, 2, generator=gen) * free
    angle = torch.rand(count, per_sequence, generator=gen) * 2 * math.pi
    velocity = torch.stack([torch.sin(angle), torch.cos(angle)], -1) * speed

    # Positions of every item in every frame, bouncing: unfold the motion on a line of
    # period 2 * free and reflect it back into [0, free].
    t = torch.arange(frames, dtype=torch.float32)[:, None, None, None]
    raw = (start[None] + t * velocity[None]) % (2 * free) if free else torch.zeros(frames, count, per_sequence, 2)
    pos = torch.where(raw > free, 2 * free - raw, raw).round().long()  # [frames, count, items, 2]

    video = torch.zeros(count, frames, canvas, canvas, dtype=torch.uint8)
    offs = torch.arange(28)
    seq = torch.arange(count)[:, None, None]
    for f in range(frames):
        for k in range(per_sequence):
            rows = (pos[f, :, k, 0][:, None] + offs)[:, :, None]  # [count, 28, 1]
            cols = (pos[f, :, k, 1][:, None] + offs)[:, None, :]  # [count, 1, 28]
            current = video[seq, f, rows, cols]
            video[seq, f, rows, cols] = torch.maximum(current, items[which[:, k]])
    return (video, which) if return_items else video
