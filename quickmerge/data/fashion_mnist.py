"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, no network).

``load_fashion_mnist("test")`` returns ``(images [N, 1, 28, 28] uint8, labels [N] int64)``.
The files are read with plain ``gzip`` + ``torch.frombuffer``; their SHA-256 sums are
checked against the published ones so a model is never evaluated on the wrong data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "QUICKMERGE_FASHION_MNIST"

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
# Mean and standard deviation of the training images' pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530


def data_dir() -> Path:
    """The directory holding the idx files: ``$QUICKMERGE_FASHION_MNIST`` or the Debian location."""
    return Path(os.environ.get(ENV_VAR, DEFAULT_DIR))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_idx(path: Path, expected_dims: int) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08 or magic & 0xFF != expected_dims:  # 0x08: unsigned byte data
        raise ValueError(f"{path} is not an idx file of {expected_dims}-d unsigned bytes (magic {magic:#x})")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims)]
    data = torch.frombuffer(bytearray(raw[4 + 4 * expected_dims:]), dtype=torch.uint8)
    return data.reshape(shape)


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` (uint8, 0-255) and labels ``[N]`` (int64) of one split.

    ``split``: "train" (60,000) or "test" (10,000). ``root`` overrides the directory.
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    base = Path(root) if root is not None else data_dir()
    img_name, lbl_name, count = FILES[split]
    missing = [n for n in (img_name, lbl_name) if not (base / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files {missing} not found in {base}. Install them with "
            f"`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or point ${ENV_VAR} "
            "at a directory holding the original idx .gz files."
        )
    images = _read_idx(base / img_name, 3)
    labels = _read_idx(base / lbl_name, 1).long()
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(f"Fashion-MNIST {split}: expected {count} 28x28 images and labels, "
                         f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    return images.unsqueeze(1), labels


def checksums(root: str | os.PathLike | None = None) -> dict[str, str]:
    """SHA-256 of every idx file, to record beside a trained checkpoint."""
    base = Path(root) if root is not None else data_dir()
    return {name: sha256(base / name) for img, lbl, _ in FILES.values() for name in (img, lbl)}


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[N, 1, 28, 28]`` -> standardised float ``[N, 1, 28, 28]``."""
    return (images.to(dtype) / 255.0 - MEAN) / STD
