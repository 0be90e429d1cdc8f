"""The reference vision model: a small timm ViT trained on Fashion-MNIST, shipped with the package.

28x28 grey images, 2x2 patches: 196 patch tokens + 1 class token, 6 blocks. The weights
(safetensors), their config, the data checksums and the training log live in
``quickmerge/assets/fashion_vit/``; ``quickmerge train vision`` reproduces them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch

from .._optional import require
from ..errors import MissingDataError

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "fashion_vit"

# Keyword arguments of timm.models.vision_transformer.VisionTransformer.
DEFAULT_CONFIG: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 2,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 128,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 2.0,
}


# The configuration of the reference model ``quickmerge train vision`` trains: the same ViT with a
# convolutional stem before the 2x2 patch projection (196 patch tokens + class token, 6 blocks).
REFERENCE_CONFIG: dict[str, Any] = {**DEFAULT_CONFIG, "conv_stem": [32, 64]}


def build_vit(config: dict[str, Any] | None = None) -> torch.nn.Module:
    """A randomly initialised timm ``VisionTransformer`` with ``config`` (default: the reference one).

    ``config`` holds ``VisionTransformer``'s keyword arguments, plus optionally
    ``conv_stem: [c1, c2, ...]``: 3x3 convolutions (GELU between) before the patch projection,
    as in "Early convolutions help transformers see better" (Xiao et al., 2021). The token
    grid is unchanged (196 patch tokens for 28x28 images and 2x2 patches).
    """
    vt = require("timm.models.vision_transformer", "vision", "The reference ViT")
    kwargs = dict(config or DEFAULT_CONFIG)
    stem = kwargs.pop("conv_stem", None)
    if stem:
        kwargs["embed_layer"] = functools.partial(_conv_stem_patch_embed(), stem_channels=tuple(stem))
    return vt.VisionTransformer(**kwargs)


@functools.cache
def _conv_stem_patch_embed() -> type:
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):
        """timm's ``PatchEmbed`` whose projection is preceded by 3x3 convolutions at full resolution."""

        def __init__(self, *args: Any, stem_channels: tuple[int, ...] = (32, 64), **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            layers: list[torch.nn.Module] = []
            channels = kwargs.get("in_chans", 3)
            for width in stem_channels:
                layers += [torch.nn.Conv2d(channels, width, 3, padding=1), torch.nn.GELU()]
                channels = width
            patch = self.patch_size
            layers.append(torch.nn.Conv2d(channels, self.proj.out_channels, patch, stride=patch))
            self.proj = torch.nn.Sequential(*layers)

    return ConvStemPatchEmbed


def load_fashion_vit(directory: str | Path | None = None) -> torch.nn.Module:
    """The trained reference ViT in eval mode, loaded with ``safetensors`` (no pickle)."""
    st = require("safetensors.torch", "vision", "Loading the reference ViT")
    base = Path(directory) if directory is not None else ASSET_DIR
    weights, config_file = base / "model.safetensors", base / "config.json"
    if not weights.is_file() or not config_file.is_file():
        raise MissingDataError(
            f"no trained ViT in {base} (expected model.safetensors and config.json); "
            "train one with `quickmerge train vision`"
        )
    config = json.loads(config_file.read_text())["model"]
    model = build_vit(config)
    missing, unexpected = model.load_state_dict(st.load_file(str(weights)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not match its config: missing {missing}, unexpected {unexpected}")
    return model.eval()


def fine_tuned_merging(directory: str | Path | None) -> dict[str, Any] | None:
    """How a checkpoint was fine-tuned with merging: its config's ``finetune`` entry (``method``, ``r`` per block
    or ``ratio``, ...) when it merged, else None (the shipped reference, a plain or unmerged training run), as
    recorded (:func:`quickmerge.vision.patch.recorded_matching` reads a QuickMerge++ one's matching)."""
    if directory is None:
        return None
    config_file = Path(directory) / "config.json"
    finetune = json.loads(config_file.read_text()).get("finetune") if config_file.is_file() else None
    if not finetune or not (finetune.get("r") or finetune.get("ratio")):
        return None
    return finetune
