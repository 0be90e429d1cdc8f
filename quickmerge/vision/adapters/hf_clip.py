"""Hugging Face CLIP and SigLIP vision towers (the image encoders of vision-language models).

``CLIPEncoderLayer`` and ``SiglipEncoderLayer`` run ``h = x + self_attn(layer_norm1(x))`` then
``h + mlp(layer_norm2(h))``: the residual merge of :mod:`.residual` with ``layer_norm2`` (where
the stream is merged) and ``mlp`` (the branch's last module). The attention goes through the
registered attention function of :mod:`.hf_vit` (captures queries and keys, adds log(size)).
CLIP keeps its class token first (never merged, its query gives the saliency); SigLIP has no
class token (its pooling head attends over every token), so no token is protected and
saliency falls back to the attention every token receives. Up to transformers 5.2x the tower
sits in ``model.vision_model``; newer releases put its parts on the model itself.
"""

from __future__ import annotations

from torch import nn

from .hf_vit import activation_checkpointing, attach_attention_and_layers
from .protocol import BlockMerger, Removable

_CLASSES = {
    "transformers.models.clip.modeling_clip": ("CLIPVisionModel", "CLIPVisionModelWithProjection"),
    "transformers.models.siglip.modeling_siglip": ("SiglipVisionModel",),
}


class HFCLIPAdapter:
    """Hugging Face ``CLIPVisionModel`` (with or without projection) and ``SiglipVisionModel``."""

    name = "Hugging Face CLIP / SigLIP vision tower"
    tested_classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel")

    def matches(self, model: nn.Module) -> bool:
        return any(c.__name__ in _CLASSES.get(c.__module__, ()) for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1 if self.has_class_token(model) else 0

    def has_class_token(self, model: nn.Module) -> bool:
        return hasattr(tower(model).embeddings, "class_embedding")  # CLIP yes, SigLIP no

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return activation_checkpointing(model) and model.training

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        layers = list(getattr(getattr(tower(model), "encoder", None), "layers", None) or [])
        parts = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
        if not layers or not all(all(hasattr(layer, p) for p in parts) for layer in layers):
            raise TypeError(f"{type(model).__name__} has no CLIP/SigLIP encoder layers to patch")
        return layers

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        return attach_attention_and_layers(
            tower(model).config, [layer.self_attn for layer in blocks], blocks, merger,
            parts=lambda layer: (layer.layer_norm2, layer.mlp),
        )


def tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder`` (``vision_model`` in older releases)."""
    return getattr(model, "vision_model", model)
