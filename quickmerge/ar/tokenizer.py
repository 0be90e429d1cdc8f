"""A patch codebook: the image and video tokenizer of the autoregressive models.

Images are cut into non-overlapping ``p x p`` patches in row-major order; each patch
becomes the index of its nearest codebook vector (squared distance in 0-255 grey levels).
The codebook is fitted by k-means (k-means++ seeding, Lloyd iterations) on patches of
training images. ``patch = 1`` is a grey-level palette (iGPT-style quantised pixels); a
larger patch is a small vector-quantised tokenizer. Pure PyTorch, batched, no training
loop beyond k-means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_CHUNK = 16_384  # rows of the distance matrix computed at once


def to_patches(images: Tensor, patch: int) -> Tensor:
    """uint8/float ``[..., H, W]`` -> float ``[..., (H/p)*(W/p), p*p]`` (row-major patches)."""
    *lead, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = images.float().reshape(*lead, h // patch, patch, w // patch, patch)
    return x.movedim(-3, -2).reshape(*lead, (h // patch) * (w // patch), patch * patch)


def from_patches(patches: Tensor, height: int, width: int, patch: int) -> Tensor:
    """Inverse of :func:`to_patches`: ``[..., (H/p)*(W/p), p*p]`` -> ``[..., H, W]``."""
    *lead, _, _ = patches.shape
    x = patches.reshape(*lead, height // patch, width // patch, patch, patch).movedim(-2, -3)
    return x.reshape(*lead, height, width)


def nearest(points: Tensor, centres: Tensor) -> tuple[Tensor, Tensor]:
    """Index ``[N]`` of the nearest centre ``[K, D]`` of each point ``[N, D]`` and its squared distance."""
    index, dist = [], []
    sq = (centres * centres).sum(-1)
    for chunk in points.split(_CHUNK):
        d = (chunk * chunk).sum(-1, keepdim=True) - 2 * chunk @ centres.T + sq
        value, idx = d.min(-1)
        index.append(idx)
        dist.append(value.clamp_min(0))
    return torch.cat(index), torch.cat(dist)


def kmeans(points: Tensor, k: int, *, iters: int = 25, seed: int = 0) -> Tensor:
    """Centres ``[k, D]`` of ``points [N, D]`` (float): k-means++ seeding, then Lloyd iterations.

    An emptied cluster is moved to the point farthest from its centre, so all ``k`` codes stay in use.
    """
    if not 1 <= k <= len(points):
        raise ValueError(f"k must be between 1 and the number of points ({len(points)}), got {k}")
    gen = torch.Generator().manual_seed(seed)
    points = points.float()
    centres = points[torch.randint(len(points), (1,), generator=gen)]
    closest = ((points - centres) ** 2).sum(-1)
    for _ in range(1, k):  # k-means++: next centre drawn in proportion to the squared distance
        weights = closest if float(closest.sum()) > 0 else torch.ones_like(closest)
        new = points[torch.multinomial(weights, 1, generator=gen)]
        centres = torch.cat([centres, new])
        closest = torch.minimum(closest, ((points - new) ** 2).sum(-1))
    for _ in range(iters):
        index, dist = nearest(points, centres)
        counts = torch.bincount(index, minlength=k).float()
        sums = torch.zeros_like(centres).index_add_(0, index, points)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
        if bool(empty.any()):
            far = dist.topk(int(empty.sum())).indices
            centres[empty] = points[far]
    return centres


@dataclass
class PatchCodebook:
    """``codebook [K, p*p]`` in grey levels 0-255; ``patch`` = p."""

    codebook: Tensor
    patch: int

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    @classmethod
    def fit(cls, images: Tensor, codes: int, patch: int, *, samples: int = 200_000, iters: int = 25,
            seed: int = 0) -> PatchCodebook:
        """k-means codebook of ``codes`` entries over ``samples`` random patches of ``images [N, H, W]`` uint8."""
        if patch < 1 or codes < 2:
            raise ValueError(f"patch must be >= 1 and codes >= 2, got patch={patch}, codes={codes}")
        points = to_patches(images, patch).reshape(-1, patch * patch)
        gen = torch.Generator().manual_seed(seed)
        if len(points) > samples:
            points = points[torch.randperm(len(points), generator=gen)[:samples]]
        centres = kmeans(points, codes, iters=iters, seed=seed)
        if patch == 1:  # a palette reads best in order: code i darker than code i + 1
            centres = centres.sort(0).values
        return cls(centres, patch)

    def encode(self, images: Tensor) -> Tensor:
        """``[..., H, W]`` (uint8 or float grey levels) -> token ids ``[..., (H/p)*(W/p)]`` (int64)."""
        patches = to_patches(images, self.patch)
        lead = patches.shape[:-1]
        index, _ = nearest(patches.reshape(-1, self.patch**2), self.codebook.to(patches.device))
        return index.reshape(lead)

    def decode(self, ids: Tensor, height: int, width: int) -> Tensor:
        """Token ids ``[..., (H/p)*(W/p)]`` -> uint8 images ``[..., H, W]``."""
        if int(ids.max()) >= self.size or int(ids.min()) < 0:
            raise ValueError(f"ids must lie in [0, {self.size}), got [{int(ids.min())}, {int(ids.max())}]")
        patches = self.codebook.to(ids.device)[ids]
        return from_patches(patches, height, width, self.patch).round().clamp(0, 255).to(torch.uint8)
