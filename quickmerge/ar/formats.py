"""How images and clips become token sequences for the autoregressive models.

Image (Fashion-MNIST, 28x28): a 16-level grey palette (``patch = 1``), so a sequence is
BOS + 784 pixel tokens in raster order. The context of an example is BOS and the top 20
rows (less the last pixel, which is fed but not scored); the scored continuation is the
bottom 8 rows: C = 560, T = 224.

Video (64x64 grey frames): a 4x4-patch codebook of 512 entries, 256 tokens per frame, so a
sequence is BOS + 4 frames in order, each in raster order. The context is BOS and the first
3 frames (C = 768); the scored continuation is the 4th frame (T = 256).

Token ids: ``0 .. codes - 1`` for the codebook, ``codes`` for BOS (vocabulary ``codes + 1``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .tokenizer import PatchCodebook


@dataclass(frozen=True)
class SequenceFormat:
    """Geometry of one modality's sequences; ``frames = 1`` for images."""

    name: str
    height: int
    width: int
    patch: int
    codes: int
    frames: int
    context_frames: int  # video: frames in the context; image: 0 (the context is rows)
    context_rows: int  # image: rows in the context; video: 0

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def length(self) -> int:
        """Sequence length: BOS + every frame's tokens."""
        return 1 + self.frames * self.tokens_per_frame

    @property
    def bos(self) -> int:
        return self.codes

    @property
    def vocab_size(self) -> int:
        return self.codes + 1

    @property
    def context(self) -> int:
        """C: tokens prefilled (and compressed) before the scored continuation."""
        if self.frames == 1:
            return self.context_rows * (self.width // self.patch)  # BOS + rows, less the last pixel
        return self.context_frames * self.tokens_per_frame  # BOS + frames, less the last token

    @property
    def continuation(self) -> int:
        """T: scored continuation tokens; ``context + continuation + 1 == length``."""
        return self.length - self.context - 1

    def to_dict(self) -> dict:
        return asdict(self)


IMAGE = SequenceFormat("image", 28, 28, patch=1, codes=16, frames=1, context_frames=0, context_rows=20)
VIDEO = SequenceFormat("video", 64, 64, patch=4, codes=512, frames=4, context_frames=3, context_rows=0)
FORMATS = {f.name: f for f in (IMAGE, VIDEO)}


def to_sequences(pixels: Tensor, fmt: SequenceFormat, tokenizer: PatchCodebook) -> Tensor:
    """uint8 ``[B, frames, H, W]`` (or ``[B, H, W]`` for images) -> token ids ``[B, fmt.length]`` with BOS first."""
    if pixels.dim() == 3:
        pixels = pixels[:, None]
    if pixels.shape[1:] != (fmt.frames, fmt.height, fmt.width):
        raise ValueError(f"{fmt.name} sequences need pixels [B, {fmt.frames}, {fmt.height}, {fmt.width}], "
                         f"got {tuple(pixels.shape)}")
    ids = tokenizer.encode(pixels).reshape(len(pixels), -1)
    bos = torch.full((len(pixels), 1), fmt.bos, dtype=ids.dtype)
    return torch.cat([bos, ids], dim=1)


def to_pixels(ids: Tensor, fmt: SequenceFormat, tokenizer: PatchCodebook) -> Tensor:
    """Token ids ``[B, n * tokens_per_frame]`` (no BOS) -> uint8 frames ``[B, n, H, W]``."""
    frames = ids.reshape(len(ids), -1, fmt.tokens_per_frame)
    return tokenizer.decode(frames, fmt.height, fmt.width)


def windows(video: Tensor, frames: int, step: int) -> Tensor:
    """Every ``frames``-long window of ``video [F, H, W]`` starting each ``step`` frames: ``[W, frames, H, W]``."""
    if len(video) < frames:
        raise ValueError(f"a clip of {len(video)} frames holds no window of {frames}")
    return video.unfold(0, frames, step).movedim(-1, 1)
