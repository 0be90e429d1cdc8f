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

A whole model (``Blip2ForConditionalGeneration``, ``BlipForConditionalGeneration`` ...: :data:`_WHOLE`) merges in
its tower, and what cross-attends to the tower's tokens reads them by size (BLIP-2's and InstructBLIP's Q-Former,
BLIP's captioning decoder and its VQA / retrieval text encoder): a pre-hook on each such cross-attention adds
log(size) to the ``encoder_attention_mask`` it is called with (proportional attention, as SigLIP's pooling head
gets; ``size_weighted_pool=False`` leaves it as it is), each image's sizes repeated where generation repeats its
tokens per beam. Patching only ``model.vision_model`` leaves them reading each merged token once.
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
# module -> whole models -> the submodule whose cross-attentions read the tower's tokens (merged in the tower, read
# there by size): BLIP-2's and InstructBLIP's Q-Former; BLIP's captioning decoder, its VQA and retrieval text encoder
# (VQA's decoder reads the question's encoding, not the image)
_WHOLE = {
    "transformers.models.blip.modeling_blip": {"BlipForConditionalGeneration": "text_decoder",
                                               "BlipForQuestionAnswering": "text_encoder",
                                               "BlipForImageTextRetrieval": "text_encoder"},
    "transformers.models.blip_2.modeling_blip_2": {"Blip2Model": "qformer", "Blip2ForConditionalGeneration": "qformer"},
    "transformers.models.instructblip.modeling_instructblip": {"InstructBlipForConditionalGeneration": "qformer"},
    "transformers.models.instructblipvideo.modeling_instructblipvideo": {
        "InstructBlipVideoForConditionalGeneration": "qformer"},
}
# the cross-attention modules inside a reader: the Q-Former's (crossattention.attention), BLIP's text's
# (crossattention.self); both take encoder_hidden_states and encoder_attention_mask
_CROSS_ATTENTIONS = ("crossattention.attention", "crossattention.self")
_LAYER_PARTS = ("layer_norm1", "self_attn", "layer_norm2", "mlp")


class HFBlipAdapter:
    """Hugging Face ``BlipVisionModel``, ``Blip2VisionModel``, ``InstructBlipVisionModel`` and
    ``InstructBlipVideoVisionModel`` (and subclasses); the whole models of :data:`_WHOLE` (their tower merges, what
    cross-attends to it reads by size)."""

    name = "Hugging Face BLIP / BLIP-2 / InstructBLIP (tower or whole model)"
    tested_classes = (*_TOWERS.values(), *(name for names in _WHOLE.values() for name in names))

    def matches(self, model: nn.Module) -> bool:
        return any(_TOWERS.get(c.__module__) == c.__name__ or _reader_of(c) for c in type(model).__mro__)

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
        reader = _reader_of(_whole_class(model))
        if reader:
            cross = _cross_attentions(model)
            if not cross or not all(takes_argument(a, n) for a in cross
                                    for n in ("encoder_hidden_states", "encoder_attention_mask")):
                raise TypeError(f"{type(model).__name__}'s {reader} has no cross-attention taking "
                                f"encoder_hidden_states and encoder_attention_mask ({' or '.join(_CROSS_ATTENTIONS)}), "
                                "where quickmerge weighs the merged image tokens by size: patch model.vision_model "
                                "alone, or run it unpatched")
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
        if _reader_of(_whole_class(model)):
            hooks += [_size_weighted_cross_attention(a, merger) for a in _cross_attentions(model)]
        hooks.append(hidden_states_check(tower(model), merger))
        return hooks


def _reader_of(cls: type) -> str | None:
    """The submodule of a whole model of :data:`_WHOLE` whose cross-attentions read the tower's tokens, else None."""
    return _WHOLE.get(cls.__module__, {}).get(cls.__name__)


def _whole_class(model: nn.Module) -> type:
    """The class of :data:`_WHOLE` ``model`` is or subclasses (its own class if none)."""
    return next((c for c in type(model).__mro__ if _reader_of(c)), type(model))


def _cross_attentions(model: nn.Module) -> list[nn.Module]:
    """The cross-attention modules of the model's reader of the image (every ``cross_attention_frequency``-th
    Q-Former layer; every layer of BLIP's text transformer)."""
    reader = getattr(model, _reader_of(_whole_class(model)) or "", None)
    if not isinstance(reader, nn.Module):
        return []
    return [m for name, m in reader.named_modules() if name.endswith(_CROSS_ATTENTIONS)]


def _size_weighted_cross_attention(attention: nn.Module, merger: BlockMerger) -> Removable:
    """Pre-hook adding log(size) of the tower's last tokens (``encoder_hidden_states [B, N, C]``) to a
    cross-attention's ``encoder_attention_mask``: none given becomes the bias ``[B, 1, 1, N]``, a float one gets it
    added, a boolean one (True: attend) becomes the bias with -inf where it is False."""
    images = CallArgument.of(attention, "encoder_hidden_states")
    mask = CallArgument.of(attention, "encoder_attention_mask")

    def attention_pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        keys = images.get(args, kwargs)
        weights = None if keys is None else _image_weights(keys, merger)
        if weights is None:
            return None
        bias: Any = size_bias(weights, keys.dtype)
        given = mask.get(args, kwargs)
        if given is not None and not isinstance(given, Tensor):
            raise TypeError(f"{type(attention).__name__} got an encoder_attention_mask of type "
                            f"{type(given).__name__}, to which quickmerge cannot add the merged tokens' log(size): "
                            "use attn_implementation='eager' or 'sdpa' for it")
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


def _image_weights(keys: Tensor, merger: BlockMerger) -> Tensor | None:
    """Sizes ``[B', N]`` of the tower's last tokens for ``keys [B', N, C]``: the last pass's, or each image's
    repeated where generation repeats every image's tokens per beam (``B' = B * beams``, images in order); None
    where the keys are not those tokens or nothing is weighed."""
    sizes = merger.sizes
    if sizes is None or keys.shape[1] != sizes.shape[1] or keys.shape[0] % sizes.shape[0]:
        return None
    weights = merger.pooling_weights(keys[: sizes.shape[0]])
    return None if weights is None else weights.repeat_interleave(keys.shape[0] // sizes.shape[0], dim=0)
