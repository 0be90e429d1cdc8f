"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, no network).

``load_fashion_mnist("test")`` returns ``(images [N, 1, 28, 28] uint8, labels [N] int64)``.
The files are read with plain ``gzip`` + ``torch.frombuffer``; their SHA-256 sums are
checked against those of the original release (:data:`SHA256`, the files Zalando
published and Debian packages) so a model is never trained or evaluated on the wrong data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
from pathlib import Path

import torch

from ..errors import MissingDataError

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
SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
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


def load_fashion_mnist(
    split: str = "test", root: str | os.PathLike | None = None, *, verify: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` (uint8, 0-255) and labels ``[N]`` (int64) of one split.

    ``split``: "train" (60,000) or "test" (10,000). ``root`` overrides the directory.
    ``verify``: check the files' SHA-256 against :data:`SHA256` (off only for synthetic files).
    """
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    base = Path(root) if root is not None else data_dir()
    img_name, lbl_name, count = FILES[split]
    missing = [n for n in (img_name, lbl_name) if not (base / n).is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST {split} files {missing} not found in {base}. Install them with "
            f"`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or point ${ENV_VAR} "
            "at a directory holding the original idx .gz files."
        )
    if verify:
        for name in (img_name, lbl_name):
            _verify(base / name)
    images = _read_idx(base / img_name, 3)
    labels = _read_idx(base / lbl_name, 1).long()
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise ValueError(f"Fashion-MNIST {split}: expected {count} 28x28 images and labels, "
                         f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    return images.unsqueeze(1), labels


@functools.lru_cache(maxsize=8)
def _verified(path: str, size: int, mtime_ns: int) -> str:
    return sha256(Path(path))


def _verify(path: Path) -> None:
    stat = path.stat()
    digest = _verified(str(path), stat.st_size, stat.st_mtime_ns)
    if digest != SHA256[path.name]:
        raise ValueError(
            f"{path} is not the original Fashion-MNIST file (SHA-256 {digest}, expected {SHA256[path.name]}); "
            f"reinstall dataset-fashion-mnist or point ${ENV_VAR} at the original idx .gz files"
        )


def checksums(root: str | os.PathLike | None = None) -> dict[str, str]:
    """SHA-256 of every idx file, to record beside a trained checkpoint."""
    base = Path(root) if root is not None else data_dir()
    return {name: sha256(base / name) for img, lbl, _ in FILES.values() for name in (img, lbl)}


def normalize(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 ``[N, 1, 28, 28]`` -> standardised float ``[N, 1, 28, 28]``."""
    return (images.to(dtype) / 255.0 - MEAN) / STD
