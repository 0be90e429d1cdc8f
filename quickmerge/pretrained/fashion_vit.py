"""The reference vision model: a small timm ViT trained on Fashion-MNIST, shipped with the package.

28x28 grey images, 2x2 patches: 196 patch tokens + 1 class token, 6 blocks. The weights
(safetensors), their config, the data checksums and the training log live in
``quickmerge/assets/fashion_vit/``; ``quickmerge train vision`` reproduces them.
"""

from __future__ import annotations

import copy
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


def as_torchvision_vit(model: torch.nn.Module) -> torch.nn.Module:
    """The timm ViT ``model`` (the reference one, or any of :func:`build_vit`'s) as torchvision's
    ``VisionTransformer``, weight for weight, in eval mode: the same function of the same images
    ``[B, in_chans, H, W]``, for checking torchvision's adapter against timm's on a trained model.

    The patch projection (with its convolutional stem, if any) becomes ``conv_proj``; queries, keys and values
    map to ``nn.MultiheadAttention``'s packed ``in_proj``. Raises ``ValueError`` for a timm ViT this mapping does
    not cover (no class token, other pooling, register tokens, LayerScale, qk-norm, a final norm before a pool, a
    norm before the blocks).
    """
    vt = require("torchvision.models.vision_transformer", "vision", "The torchvision copy of the reference ViT")
    _check_plain_vit(model, "as_torchvision_vit")
    width, first = model.embed_dim, model.blocks[0]
    tv = vt.VisionTransformer(
        image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
        num_layers=len(model.blocks), num_heads=first.attn.num_heads, hidden_dim=width,
        mlp_dim=first.mlp.fc1.out_features, num_classes=model.head.out_features)
    tv.conv_proj = copy.deepcopy(model.patch_embed.proj)
    state = {"class_token": model.cls_token, "encoder.pos_embedding": model.pos_embed,
             "encoder.ln.weight": model.norm.weight, "encoder.ln.bias": model.norm.bias,
             "heads.head.weight": model.head.weight, "heads.head.bias": model.head.bias}
    for i, block in enumerate(model.blocks):
        into = f"encoder.layers.encoder_layer_{i}."
        state |= {into + "ln_1.weight": block.norm1.weight, into + "ln_1.bias": block.norm1.bias,
                  into + "self_attention.in_proj_weight": block.attn.qkv.weight,
                  into + "self_attention.in_proj_bias": block.attn.qkv.bias,
                  into + "self_attention.out_proj.weight": block.attn.proj.weight,
                  into + "self_attention.out_proj.bias": block.attn.proj.bias,
                  into + "ln_2.weight": block.norm2.weight, into + "ln_2.bias": block.norm2.bias,
                  into + "mlp.0.weight": block.mlp.fc1.weight, into + "mlp.0.bias": block.mlp.fc1.bias,
                  into + "mlp.3.weight": block.mlp.fc2.weight, into + "mlp.3.bias": block.mlp.fc2.bias}
    missing, unexpected = tv.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("conv_proj.")]
    if missing or unexpected:
        raise ValueError(f"torchvision's VisionTransformer does not take this mapping: missing {missing}, "
                         f"unexpected {unexpected}")
    return tv.eval()


def _check_plain_vit(model: torch.nn.Module, converter: str) -> None:
    """Raise ``ValueError`` unless ``model`` is a timm ViT the converters map: a class token read by the head, no
    register tokens, LayerScale, qk-norm, pre-norm or norm before the head's pool."""
    plain = {
        "a class token": getattr(model, "cls_token", None) is not None,
        "class-token pooling": getattr(model, "global_pool", None) == "token",
        "no register tokens": getattr(model, "num_reg_tokens", 0) == 0,
        "no fc_norm": isinstance(getattr(model, "fc_norm", None), torch.nn.Identity),
        "no norm_pre": isinstance(getattr(model, "norm_pre", torch.nn.Identity()), torch.nn.Identity),
        "plain blocks": all(isinstance(b.ls1, torch.nn.Identity) and isinstance(b.attn.q_norm, torch.nn.Identity)
                            and isinstance(b.attn.k_norm, torch.nn.Identity) for b in model.blocks),
    }
    lacking = [what for what, ok in plain.items() if not ok]
    if lacking:
        raise ValueError(f"{converter} needs a timm ViT with {', '.join(plain)}; not so here: {', '.join(lacking)}")


class _StemProjection(torch.nn.Sequential):
    """A convolutional stem as Hugging Face ViT's patch projection, which reads ``projection.weight.dtype`` to cast the
    pixels: the first layer's weight."""

    @property
    def weight(self) -> torch.Tensor:
        return self[0].weight


# Hugging Face classes as_hf_vit builds: a final layernorm, then a linear classifier on the class token
HF_CLASSIFIERS = ("ViTForImageClassification", "ViTMSNForImageClassification")


@torch.no_grad()
def as_hf_vit(model: torch.nn.Module, cls_name: str = "ViTForImageClassification") -> torch.nn.Module:
    """The timm ViT ``model`` (the reference one, or any of :func:`build_vit`'s) as a Hugging Face
    ``ViTForImageClassification`` or ``ViTMSNForImageClassification`` (``cls_name``), weight for weight, in eval mode
    with SDPA attention: the same function of the same images ``[B, in_chans, H, W]``, for checking the Hugging Face
    ViT adapter against timm's on a trained model.

    The patch projection (with its convolutional stem, if any) becomes ``patch_embeddings.projection``; the fused
    ``qkv`` is split into queries, keys and values. Both layouts of transformers' ViT layer are filled (up to 5.2x:
    ``attention.attention.query`` ..., ``intermediate`` / ``output``; later: ``attention.q_proj`` ..., ``mlp``).
    Raises ``ValueError`` for a timm ViT the mapping does not cover, or another ``cls_name``.
    """
    transformers = require("transformers", "text", "The Hugging Face copy of the reference ViT")
    if cls_name not in HF_CLASSIFIERS:
        raise ValueError(f"cls_name must be one of {HF_CLASSIFIERS}, got {cls_name!r}")
    _check_plain_vit(model, "as_hf_vit")
    first = model.blocks[0]
    config_cls = transformers.ViTMSNConfig if cls_name.startswith("ViTMSN") else transformers.ViTConfig
    config = config_cls(image_size=model.patch_embed.img_size[0], patch_size=model.patch_embed.patch_size[0],
                        num_channels=model.patch_embed.proj[0].in_channels if isinstance(
                            model.patch_embed.proj, torch.nn.Sequential) else model.patch_embed.proj.in_channels,
                        hidden_size=model.embed_dim, num_hidden_layers=len(model.blocks),
                        num_attention_heads=first.attn.num_heads, intermediate_size=first.mlp.fc1.out_features,
                        hidden_act="gelu", layer_norm_eps=first.norm1.eps, qkv_bias=first.attn.qkv.bias is not None,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=model.head.out_features, attn_implementation="sdpa")
    hf = getattr(transformers, cls_name)(config).eval()
    base = hf.vit
    proj = copy.deepcopy(model.patch_embed.proj)
    base.embeddings.patch_embeddings.projection = _StemProjection(*proj) if isinstance(proj, torch.nn.Sequential) \
        else proj
    base.embeddings.cls_token.copy_(model.cls_token)
    base.embeddings.position_embeddings.copy_(model.pos_embed)
    layers = base.encoder.layer if hasattr(base, "encoder") else base.layers
    for block, layer in zip(model.blocks, layers, strict=True):
        attention = layer.attention
        old = hasattr(attention, "attention")  # the layout up to 5.2x
        q, k, v = ((attention.attention.query, attention.attention.key, attention.attention.value) if old
                   else (attention.q_proj, attention.k_proj, attention.v_proj))
        out = attention.output.dense if old else attention.o_proj
        fc1, fc2 = (layer.intermediate.dense, layer.output.dense) if old else (layer.mlp.fc1, layer.mlp.fc2)
        for target, weight, bias in [*zip((q, k, v), block.attn.qkv.weight.chunk(3),
                                          block.attn.qkv.bias.chunk(3) if block.attn.qkv.bias is not None
                                          else (None,) * 3, strict=True),
                                     (out, block.attn.proj.weight, block.attn.proj.bias),
                                     (fc1, block.mlp.fc1.weight, block.mlp.fc1.bias),
                                     (fc2, block.mlp.fc2.weight, block.mlp.fc2.bias)]:
            target.weight.copy_(weight)
            if bias is not None:
                target.bias.copy_(bias)
        for target, norm in ((layer.layernorm_before, block.norm1), (layer.layernorm_after, block.norm2)):
            target.weight.copy_(norm.weight)
            target.bias.copy_(norm.bias)
    base.layernorm.weight.copy_(model.norm.weight)
    base.layernorm.bias.copy_(model.norm.bias)
    hf.classifier.weight.copy_(model.head.weight)
    hf.classifier.bias.copy_(model.head.bias)
    return hf
