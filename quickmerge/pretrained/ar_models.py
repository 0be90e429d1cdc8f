"""The autoregressive image and video models shipped with the package (trained here).

``quickmerge/assets/ar_image`` and ``ar_video`` each hold a ``LlamaForCausalLM``
(safetensors + config), its patch codebook, its sequence format and ``training.json``
(recipe, data checksums, log); ``quickmerge train ar-image`` / ``ar-video`` reproduce them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import MissingDataError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets"


def ar_model_dir(modality: str) -> Path:
    """Where the shipped ``modality`` ("image" or "video") model lives."""
    if modality not in ("image", "video"):
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
    return ASSET_DIR / f"ar_{modality}"


def ar_model_path(modality_or_dir: str | Path) -> Path:
    """The directory of the shipped ``"image"`` / ``"video"`` model, or ``modality_or_dir`` itself."""
    name = str(modality_or_dir)
    return ar_model_dir(name) if name in ("image", "video") else Path(modality_or_dir)


def ar_format(modality_or_dir: str | Path) -> Any:
    """The :class:`~quickmerge.ar.formats.SequenceFormat` of the shipped ``"image"`` / ``"video"`` model or of a
    directory saved by ``quickmerge train ar-image/ar-video``, read without loading the model; None for anything else
    (a causal LM's name or directory)."""
    from ..ar.formats import FORMATS
    from ..ar.model import FORMAT_FILE, read_format

    directory = ar_model_path(modality_or_dir)
    if (directory / FORMAT_FILE).is_file():
        return read_format(directory)
    return FORMATS.get(str(modality_or_dir))  # the shipped model not there: load_ar says how to train it


def ar_weights(modality_or_dir: str | Path) -> Path:
    """``model.safetensors`` of the shipped ``"image"`` / ``"video"`` model (MissingDataError, saying how to train it,
    when it is not there) or of a directory."""
    path = ar_model_path(modality_or_dir) / "model.safetensors"
    if str(modality_or_dir) in ("image", "video") and not path.is_file():
        raise MissingDataError(
            f"no shipped {modality_or_dir} model in {path.parent}; train one with "
            f"`quickmerge train ar-{modality_or_dir} --out {path.parent}` or pass --model DIR"
        )
    return path


def load_ar(modality_or_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, Any]:
    """(model, tokenizer, format) of the shipped ``"image"`` / ``"video"`` model, or of a directory."""
    from ..ar.model import load_ar_model

    return load_ar_model(ar_weights(modality_or_dir).parent, dtype=dtype)
