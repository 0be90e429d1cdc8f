"""Hugging Face AIMv2 vision tower (Apple's image encoder for vision-language models; ``Aimv2Model.vision_model``).

``Aimv2EncoderLayer`` runs ``h = x + attention(rms_norm1(x))`` then ``h + ffn(rms_norm2(h))``: the residual merge of
:mod:`.residual` with ``rms_norm2`` (where the stream is merged) and ``ffn`` (the branch's last module). The attention
goes through the registered attention function of :mod:`.hf_vit` (captures queries and keys, adds log(size)). AIMv2
has no class token: every token may merge, and saliency falls back to the attention every token receives.

The optional pooling head (``use_head``) attends from one learned query over the normed tokens with
``F.scaled_dot_product_attention`` and no mask. Within the tower's call its input is put back on the patch grid, every
patch a copy of the token it was merged into (:meth:`~quickmerge.vision.patch.MergeHandle.expand_to_patches`): for
one query, n copies of a key weigh what that key weighs with log(n) added to its logit, so this is the proportional
attention of the blocks, exactly (it costs the head's two projections on every patch; the head is a sliver of the
tower). With ``size_weighted_pool=False`` the head reads the merged tokens as they are. Where ``method="random"``
dropped patches, each of those reads the size-weighted mean of the tokens (what ``expand_to_patches`` gives a
dropped patch), a key no patch had.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .hf_vit import activation_checkpointing, attach_attention_and_layers, attention_implementation, hidden_states_check
from .pooling import LastOutput
from .protocol import BlockMerger, Removable

_MODULE = "transformers.models.aimv2.modeling_aimv2"
_CLASSES = ("Aimv2VisionModel",)
_LAYER_PARTS = ("rms_norm1", "attention", "rms_norm2", "ffn")


class HFAimv2Adapter:
    """Hugging Face ``Aimv2VisionModel`` (the tower inside ``Aimv2Model``, its ``vision_model``) and subclasses."""

    name = "Hugging Face AIMv2 vision tower"
    tested_classes = _CLASSES

    def matches(self, model: nn.Module) -> bool:
        return any(c.__module__ == _MODULE and c.__name__ in _CLASSES for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def has_class_token(self, model: nn.Module) -> bool:
        return False

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return activation_checkpointing(model) and model.training

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        layers = list(getattr(getattr(model, "encoder", None), "layers", None) or [])
        if not layers or not all(all(hasattr(layer, p) for p in _LAYER_PARTS) for layer in layers):
            raise TypeError(f"{type(model).__name__} has no AIMv2 encoder layers ({', '.join(_LAYER_PARTS)}) to patch")
        if _head(model) is not None and not isinstance(getattr(model, "rms_norm", None), nn.Module):
            raise TypeError(f"{type(model).__name__} has no final norm named rms_norm, whose output its pooling head "
                            "reads: this transformers release is not supported")
        attention_implementation(model.config)
        return layers

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        hooks = attach_attention_and_layers(model.config, [layer.attention for layer in blocks], blocks, merger,
                                            parts=lambda layer: (layer.rms_norm2, layer.ffn))
        head = _head(model)
        if head is not None:
            hooks += _pooling_over_patches(model, model.rms_norm, head, merger)
        hooks.append(hidden_states_check(model, merger))
        return hooks


def _head(model: nn.Module) -> nn.Module | None:
    """The pooling head, where the config asks for one (``use_head``)."""
    head = getattr(model, "head", None)
    return head if getattr(model, "use_head", head is not None) and isinstance(head, nn.Module) else None


def _pooling_over_patches(vision: nn.Module, final_norm: nn.Module, head: nn.Module,
                          merger: BlockMerger) -> list[Removable]:
    """A pre-hook giving ``head`` the patches (each a copy of its token) instead of the merged tokens, within a call of
    ``vision``: only for the tokens the final norm returned in this pass, whose sizes the merger holds."""
    final = LastOutput(final_norm, owner=vision, keep_input=False)

    def head_pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        hidden: Tensor | None = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden is not final.tensor:
            return None
        final.tensor = None
        if merger.pooling_weights(hidden) is None:  # nothing merged, or size_weighted_pool off
            return None
        patches = merger.expand_to_patches(hidden)
        if patches is None:
            return None
        if args:
            return (patches, *args[1:]), kwargs
        new_kwargs: dict[str, Any] = {**kwargs, "hidden_states": patches}
        return args, new_kwargs

    return [final, head.register_forward_pre_hook(head_pre, with_kwargs=True)]
