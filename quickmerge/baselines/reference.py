"""The spec's algorithm implemented the straightforward way, as the public reference code does.

Kept only as the speed baseline of ``benchmarks/core_speed.py``: it recomputes one
attention map ``softmax(X X^T / sqrt(D))`` for every "layer", takes a Gumbel
softmax over all N tokens (so the mask sums to 1), and clusters each sequence on
the CPU with scikit-learn's agglomerative clustering (cosine, average linkage).
Needs the ``bench`` extra (scikit-learn).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..errors import MissingExtraError


def reference_quickmerge(
    X: Tensor, K: int, num_layers: int = 12, temperature: float = 0.1, epsilon: float = 0.01
) -> Tensor:
    """Merged tokens ``[B, K, D]`` by the reference procedure (slow by design)."""
    try:
        from sklearn.cluster import AgglomerativeClustering
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingExtraError("the reference baseline needs scikit-learn: pip install 'quickmerge[bench]'") from err
    b, _, d = X.shape
    entropies = []
    for _ in range(num_layers):
        attn = torch.softmax(X @ X.transpose(1, 2) / math.sqrt(d), dim=-1)
        h = -(attn * torch.log(attn + 1e-9)).sum(-1)
        low, high = h.min(-1, keepdim=True).values, h.max(-1, keepdim=True).values
        entropies.append((h - low) / (high - low + 1e-9))
    s = torch.stack(entropies).mean(0)
    g = -torch.log(-torch.log(torch.rand_like(s).clamp(1e-10, 1 - 1e-7)))
    pi = torch.softmax((s + g) / temperature, dim=-1)
    mass = (pi * s + (1 - pi) * epsilon).numpy()
    out = np.zeros((b, K, d), dtype=np.float32)
    for i in range(b):
        feats = X[i].numpy()
        labels = AgglomerativeClustering(n_clusters=K, metric="cosine", linkage="average").fit_predict(feats)
        sums = np.zeros((K, d), dtype=np.float64)
        np.add.at(sums, labels, mass[i][:, None] * feats)
        totals = np.bincount(labels, weights=mass[i], minlength=K)
        out[i] = sums / totals[:, None]
    return torch.from_numpy(out)
