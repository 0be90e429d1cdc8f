"""Hugging Face CLIP and SigLIP vision towers (the image encoders of vision-language models).

``CLIPEncoderLayer`` and ``SiglipEncoderLayer`` run ``h = x + self_attn(layer_norm1(x))`` then
``h + mlp(layer_norm2(h))``: the residual merge of :mod:`.residual` with ``layer_norm2`` (where
the stream is merged) and ``mlp`` (the branch's last module). The attention goes through the
registered attention function of :mod:`.hf_vit` (captures queries and keys, adds log(size)).
CLIP keeps its class token first (never merged, its query gives the saliency); SigLIP has no
class token (its pooling head attends over every token), so no token is protected and
saliency falls back to the attention every token receives. SigLIP's pooling head (a probe query
attending over the tokens, ``torch.nn.MultiheadAttention``) gets log(size) as its additive mask,
the proportional attention of the blocks, so it pools over the original patches. Up to
transformers 5.2x the tower sits in ``model.vision_model``; newer releases put its parts on the
model itself.
"""

from __future__ import annotations

from torch import nn

from .hf_vit import activation_checkpointing, attach_attention_and_layers, attention_implementation
from .pooling import LastOutput, size_bias
from .protocol import BlockMerger, Removable

# the ...VisionTransformer classes are the towers inside CLIPModel / SiglipModel (``model.vision_model``) up to
# transformers 5.2x; newer releases put a ...VisionModel there
_CLASSES = {
    "transformers.models.clip.modeling_clip": ("CLIPVisionModel", "CLIPVisionModelWithProjection",
                                               "CLIPVisionTransformer"),
    "transformers.models.siglip.modeling_siglip": ("SiglipVisionModel", "SiglipVisionTransformer"),
}


class HFCLIPAdapter:
    """Hugging Face ``CLIPVisionModel`` (with or without projection) and ``SiglipVisionModel``, and the towers of
    ``CLIPModel`` / ``SiglipModel`` (their ``vision_model``)."""

    name = "Hugging Face CLIP / SigLIP vision tower"
    tested_classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel", "CLIPVisionTransformer",
                      "SiglipVisionTransformer")

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
        attention_implementation(tower(model).config)
        return layers

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        hooks = attach_attention_and_layers(
            tower(model).config, [layer.self_attn for layer in blocks], blocks, merger,
            parts=lambda layer: (layer.layer_norm2, layer.mlp),
        )
        head = getattr(tower(model), "head", None)
        if isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
            hooks += _proportional_pooling(tower(model).post_layernorm, head.attention, merger)
        return hooks


def _proportional_pooling(final_norm: nn.Module, attention: nn.MultiheadAttention,
                          merger: BlockMerger) -> list[Removable]:
    """Hooks adding log(size) to the pooling head's attention logits (``attn_mask [B * heads, 1, N]``).

    Only for the keys the final norm returned in this pass, whose sizes the merger holds; a mask the
    head was given by someone else is refused rather than replaced."""
    final = LastOutput(final_norm)

    def attention_pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        key = args[1] if len(args) > 1 else kwargs.get("key")
        if key is None or key is not final.tensor:
            return None
        final.tensor = None
        weights = merger.pooling_weights(key)
        if weights is None:
            return None
        if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None or len(args) > 3:
            raise ValueError("quickmerge's proportional pooling cannot be combined with a mask the head passes itself "
                             "(pass size_weighted_pool=False to quickmerge.patch)")
        length = (args[0] if args else kwargs["query"]).shape[1]
        mask = size_bias(weights, key.dtype).expand(-1, attention.num_heads, length, -1)
        return args, {**kwargs, "attn_mask": mask.reshape(-1, length, key.shape[1])}

    return [final, attention.register_forward_pre_hook(attention_pre, with_kwargs=True)]


def tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` and ``encoder`` (``vision_model`` in older releases)."""
    return getattr(model, "vision_model", model)
