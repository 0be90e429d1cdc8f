"""Hugging Face BLIP, BLIP-2, InstructBLIP and InstructBLIP-Video vision towers (the image encoders of Salesforce's
captioning, VQA and retrieval models).

Their layers are CLIP's: ``h = x + self_attn(layer_norm1(x))`` then ``h + mlp(layer_norm2(h))``, the class token
first (never merged; its query gives the saliency), the pooled output the class token after ``post_layernorm``: the
residual merge of :mod:`.residual` with ``layer_norm2`` and ``mlp``. BLIP-2's and both InstructBLIPs' attention goes
through transformers' attention interface: the registered attention function of :mod:`.hf_vit`, as CLIP's does.
BLIP's attention is written out (``qkv``, a matmul, softmax, ``dropout`` on the probabilities, no mask argument):

- a hook on ``qkv`` reads queries and keys ``[B, H, N, hd]`` off its output;
- a pre-hook on the attention's ``dropout`` re-weights the probabilities ``p [B, H, N, N]`` by the keys' sizes
  ``w``: ``w p / sum(w p)`` is ``softmax(logits + log w)``, proportional attention, before the dropout as the logits'
  mask would be.

A whole BLIP-2 / InstructBLIP model (``Blip2ForConditionalGeneration`` ...) merges in its tower, and its Q-Former,
whose learned queries cross-attend to the tower's tokens, reads them by size: a pre-hook on each cross-attention
adds log(size) to the ``encoder_attention_mask`` it is called with (proportional attention, as SigLIP's pooling head
gets; ``size_weighted_pool=False`` leaves it as it is). Patching only ``model.vision_model`` leaves the Q-Former
reading each merged token once; so does BLIP's text decoder, whose model is not patched whole.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ...call_arguments import CallArgument, takes_argument
from .hf_clip import tower
from .hf_vit import activation_checkpointing, attach_attention_and_layers, attention_implementation, hidden_states_check
from .pooling import size_bias
from .protocol import BlockMerger, Removable
from .residual import residual_merge_hooks

# module -> the family's vision tower (the ``vision_model`` of its captioning / VQA / retrieval models)
_TOWERS = {
    "transformers.models.blip.modeling_blip": "BlipVisionModel",
    "transformers.models.blip_2.modeling_blip_2": "Blip2VisionModel",
    "transformers.models.instructblip.modeling_instructblip": "InstructBlipVisionModel",
    "transformers.models.instructblipvideo.modeling_instructblipvideo": "InstructBlipVideoVisionModel",
}
# module -> whole models whose Q-Former cross-attends to their tower's tokens (merged in the tower, read by size)
_WITH_QFORMER = {
    "transformers.models.blip_2.modeling_blip_2": ("Blip2Model", "Blip2ForConditionalGeneration"),
    "transformers.models.instructblip.modeling_instructblip": ("InstructBlipForConditionalGeneration",),
    "transformers.models.instructblipvideo.modeling_instructblipvideo": ("InstructBlipVideoForConditionalGeneration",),
}
_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")


class HFBlipAdapter:
    """Hugging Face ``BlipVisionModel``, ``Blip2VisionModel``, ``InstructBlipVisionModel`` and
    ``InstructBlipVideoVisionModel`` (and subclasses); ``Blip2Model``, ``Blip2ForConditionalGeneration``,
    ``InstructBlipForConditionalGeneration`` and ``InstructBlipVideoForConditionalGeneration`` whole (their tower
    merges, their Q-Former reads by size)."""

    name = "Hugging Face BLIP / BLIP-2 / InstructBLIP vision tower"
    tested_classes = (*_TOWERS.values(), *(name for names in _WITH_QFORMER.values() for name in names))

    def matches(self, model: nn.Module) -> bool:
        return any(_TOWERS.get(c.__module__) == c.__name__ or _has_qformer(c) for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1

    def has_class_token(self, model: nn.Module) -> bool:
        return True

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return activation_checkpointing(model) and model.training

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        layers = list(getattr(getattr(tower(model), "encoder", None), "layers", None) or [])
        if not layers or not all(all(hasattr(layer, p) for p in _LAYER_PARTS) for layer in layers):
            raise TypeError(f"{type(model).__name__} has no BLIP encoder layers ({', '.join(_LAYER_PARTS)}) to patch")
        if not hasattr(tower(model).embeddings, "class_embedding"):
            raise TypeError(f"{type(model).__name__}'s embeddings have no class_embedding, the token quickmerge "
                            "keeps first: this transformers release is not supported")
        kinds = {_attention_kind(layer.self_attn) for layer in layers}
        if kinds == {"written out"}:
            for layer in layers:
                for part in ("qkv", "dropout"):
                    if not isinstance(getattr(layer.self_attn, part, None), nn.Module):
                        raise TypeError(f"{type(layer.self_attn).__name__} has no {part} module, where quickmerge "
                                        "reads queries and keys and weighs the attention by size")
        elif kinds == {"interface"}:
            attention_implementation(tower(model).config)
        else:
            raise TypeError(f"{type(model).__name__} mixes attentions written out and through the attention "
                            "interface: not a BLIP tower quickmerge knows")
        if _has_qformer(type(model)):
            cross = _cross_attentions(model)
            if not cross or not all(takes_argument(a, n) for a in cross
                                    for n in ("encoder_hidden_states", "encoder_attention_mask")):
                raise TypeError(f"{type(model).__name__}'s Q-Former has no cross-attention taking "
                                "encoder_hidden_states and encoder_attention_mask (qformer.encoder.layer[i]."
                                "crossattention.attention), where quickmerge weighs the merged image tokens by size: "
                                "patch model.vision_model alone, or run it unpatched")
        return layers

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        if _attention_kind(blocks[0].self_attn) == "written out":
            hooks: list[Removable] = []
            for i, layer in enumerate(blocks):
                hooks += [*_written_out_attention_hooks(layer.self_attn, merger),
                          *residual_merge_hooks(layer, i, merger, layer.layer_norm2, layer.mlp)]
        else:
            hooks = attach_attention_and_layers(tower(model).config, [layer.self_attn for layer in blocks], blocks,
                                                merger, parts=lambda layer: (layer.layer_norm2, layer.mlp))
        if _has_qformer(type(model)):
            hooks += [_size_weighted_cross_attention(a, merger) for a in _cross_attentions(model)]
        hooks.append(hidden_states_check(tower(model), merger))
        return hooks


def _has_qformer(cls: type) -> bool:
    return cls.__name__ in _WITH_QFORMER.get(cls.__module__, ())


def _cross_attentions(model: nn.Module) -> list[nn.Module]:
    """The attention modules of the Q-Former's cross-attentions (every ``cross_attention_frequency``-th layer)."""
    layers = getattr(getattr(getattr(model, "qformer", None), "encoder", None), "layer", None) or []
    found = [getattr(getattr(layer, "crossattention", None), "attention", None) for layer in layers]
    return [a for a in found if isinstance(a, nn.Module)]


def _size_weighted_cross_attention(attention: nn.Module, merger: BlockMerger) -> Removable:
    """Pre-hook adding log(size) of the tower's last tokens (``encoder_hidden_states [B, N, C]``) to a Q-Former
    cross-attention's ``encoder_attention_mask``: none given becomes the bias ``[B, 1, 1, N]``, a float one gets it
    added, a boolean one (True: attend) becomes the bias with -inf where it is False."""
    images = CallArgument.of(attention, "encoder_hidden_states")
    mask = CallArgument.of(attention, "encoder_attention_mask")

    def attention_pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        keys = images.get(args, kwargs)
        weights = None if keys is None else merger.pooling_weights(keys)
        if weights is None:
            return None
        bias: Any = size_bias(weights, keys.dtype)
        given = mask.get(args, kwargs)
        if given is not None and not isinstance(given, Tensor):
            raise TypeError(f"{type(attention).__name__} got an encoder_attention_mask of type "
                            f"{type(given).__name__}, to which quickmerge cannot add the merged tokens' log(size): "
                            "use attn_implementation='eager' or 'sdpa' for the Q-Former")
        if given is not None:
            bias = torch.where(given, bias, float("-inf")) if given.dtype == torch.bool else given + bias
        return mask.replace(args, kwargs, bias), kwargs

    return attention.register_forward_pre_hook(attention_pre, with_kwargs=True)


def _attention_kind(attention: nn.Module) -> str:
    """``"interface"`` where the attention's forward calls transformers' attention interface (BLIP-2's),
    ``"written out"`` where it takes its own softmax and dropout of the ``qkv`` projection (BLIP's); read off the
    names its code uses, so that a release moving BLIP to the interface is not hooked the old way. TypeError if
    neither."""
    names = set(inspect.unwrap(type(attention).forward).__code__.co_names)
    if "ALL_ATTENTION_FUNCTIONS" in names:
        return "interface"
    if {"qkv", "softmax", "dropout"} <= names:
        return "written out"
    raise TypeError(f"{type(attention).__name__}.forward neither calls transformers' attention interface nor takes "
                    "its own softmax and dropout of qkv: quickmerge cannot reach its attention (this transformers "
                    "release is not supported)")


def _written_out_attention_hooks(attention: nn.Module, merger: BlockMerger) -> list[Removable]:
    """Hooks of one BLIP attention: queries and keys from ``qkv``'s output ``[B, N, 3 * H * hd]``, and the
    probabilities ``[B, H, N, N]`` re-weighted by the keys' sizes before ``dropout`` (proportional attention)."""
    heads = attention.num_heads

    def qkv_hook(_m: nn.Module, _args: tuple, out: Tensor) -> None:
        if merger.needs_qk():
            b, n, width = out.shape
            q, k, _ = out.reshape(b, n, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)
            merger.record_qk(q=q, k=k, scale=float(attention.scale))

    def dropout_pre(_m: nn.Module, args: tuple) -> tuple | None:
        bias = merger.attention_bias(args[0])  # [B, 1, 1, N]: log(size)
        if bias is None:
            return None
        weighted = args[0] * bias.exp()
        return (weighted / weighted.sum(dim=-1, keepdim=True),)

    return [attention.qkv.register_forward_hook(qkv_hook), attention.dropout.register_forward_pre_hook(dropout_pre)]
