"""Hugging Face CLIP, SigLIP and SigLIP 2 vision towers (the image encoders of vision-language models).

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

SigLIP 2 (NaFlex) pads a batch of images of different aspect ratios to one length and passes a
padding mask ``[B, N]`` (``pixel_attention_mask``): a pre-hook on the tower keeps it and the first
layer's pre-hook hands it to the merger (:meth:`~quickmerge.vision.patch.MergeHandle.set_padding`),
which gives the padding size 0: merged first, weightless, and masked by the attention bias that
replaces the model's own mask in every layer (made for the unmerged tokens). The pooling head gets
the same: its mask argument is dropped and the head's attention masks the padding by size.

``...ForImageClassification`` averages the tower's output tokens in its own forward (SigLIP 2's by
the unmerged padding mask): within its call the tower's merged tokens are put back on the patch grid
(every patch the token it was merged into), so that mean is the size-weighted one over the patches.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...call_arguments import CallArgument, takes_argument
from .hf_vit import activation_checkpointing, attach_attention_and_layers, attention_implementation, hidden_states_check
from .pooling import LastOutput, size_bias
from .protocol import BlockMerger, Removable
from .unmerge import unmerged_within_call

# the ...VisionTransformer classes are the towers inside CLIPModel / SiglipModel (``model.vision_model``) up to
# transformers 5.2x; newer releases put a ...VisionModel there
_CLASSES = {
    "transformers.models.clip.modeling_clip": ("CLIPVisionModel", "CLIPVisionModelWithProjection",
                                               "CLIPVisionTransformer", "CLIPForImageClassification"),
    "transformers.models.siglip.modeling_siglip": ("SiglipVisionModel", "SiglipVisionTransformer",
                                                   "SiglipForImageClassification"),
    "transformers.models.siglip2.modeling_siglip2": ("Siglip2VisionModel", "Siglip2VisionTransformer",
                                                     "Siglip2ForImageClassification"),
}
# image classifiers: a linear head on the mean of the tower's tokens, taken in the model's own forward
_CLASSIFIERS = ("CLIPForImageClassification", "SiglipForImageClassification", "Siglip2ForImageClassification")
# what the SigLIP 2 tower's forward calls its padding mask [B, N]: 5.2x's transformer, later releases' model
_PADDING_ARGUMENTS = ("pixel_attention_mask", "attention_mask")


class HFCLIPAdapter:
    """Hugging Face ``CLIPVisionModel`` (with or without projection), ``SiglipVisionModel`` and
    ``Siglip2VisionModel``, the towers of ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` (their
    ``vision_model``), and the three families' ``...ForImageClassification``."""

    name = "Hugging Face CLIP / SigLIP / SigLIP 2 vision tower"
    tested_classes = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "SiglipVisionModel", "CLIPVisionTransformer",
                      "SiglipVisionTransformer", "Siglip2VisionModel", "Siglip2VisionTransformer", *_CLASSIFIERS)

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
        if _is_classifier(model) and not isinstance(getattr(model, "classifier", None), nn.Module):
            raise TypeError(f"{type(model).__name__} has no classifier module on the tower's pooled tokens")
        if _is_classifier(model) and not self.has_class_token(model):
            _post_layernorm(model)  # refused here, before any hook, if a release renamed it
        if _is_siglip2(model):
            _padding_argument(tower(model))  # a release renaming the mask must not leave the padding unmasked
            if _is_classifier(model) and not takes_argument(model, "pixel_attention_mask"):
                raise TypeError(f"{type(model).__name__}'s forward takes no 'pixel_attention_mask', the padding "
                                "mask its head averages by")
            head = getattr(tower(model), "head", None)
            if head is not None and not takes_argument(head, "attention_mask"):
                raise TypeError(f"{type(head).__name__}'s forward takes no 'attention_mask', the padding mask "
                                "quickmerge replaces for merged tokens")
        return layers

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        hooks = attach_attention_and_layers(
            tower(model).config, [layer.self_attn for layer in blocks], blocks, merger,
            parts=lambda layer: (layer.layer_norm2, layer.mlp),
        )
        head = getattr(tower(model), "head", None)
        if isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
            hooks += _proportional_pooling(tower(model), tower(model).post_layernorm, head.attention, merger)
        if _is_siglip2(model):
            hooks += _padding_hooks(tower(model), blocks[0], head, merger)
        if _is_classifier(model):
            hooks += _classifier_hooks(model, merger)
        hooks.append(hidden_states_check(model, merger))
        return hooks


def _is_classifier(model: nn.Module) -> bool:
    return any(c.__name__ in _CLASSIFIERS for c in type(model).__mro__)


def _is_siglip2(model: nn.Module) -> bool:
    return any(c.__module__ == "transformers.models.siglip2.modeling_siglip2" for c in type(tower(model)).__mro__)


def _padding_argument(module: nn.Module) -> str:
    """The name under which the SigLIP 2 tower ``module`` takes its padding mask; TypeError if none."""
    for name in _PADDING_ARGUMENTS:
        if takes_argument(module, name):
            return name
    raise TypeError(f"{type(module).__name__}'s forward takes none of {_PADDING_ARGUMENTS}, the padding mask "
                    "quickmerge needs to keep padding out of merges")


def _padding_hooks(vision: nn.Module, first_block: nn.Module, head: nn.Module | None,
                   merger: BlockMerger) -> list[Removable]:
    """Hooks handing a SigLIP 2 tower's padding mask to ``merger`` and keeping it from the pooling head.

    The tower's pre-hook keeps the mask ``[B, N]`` it was called with; the first layer's pre-hook (after the
    one that begins the pass) passes it on when the pass merges or is observed (otherwise the model runs as
    unpatched). The head's pre-hook drops its mask argument for the last pass's merged tokens: the hook on the head's
    attention (:func:`_proportional_pooling`) masks the padding by size instead."""
    padding_mask = CallArgument.of(vision, _padding_argument(vision))
    state: dict[str, Any] = {"mask": None}

    def vision_pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        state["mask"] = padding_mask.get(args, kwargs)

    def block_pre(_m: nn.Module, _args: tuple) -> None:
        mask, state["mask"] = state["mask"], None
        if mask is not None and merger.needs_qk():  # it merges, or a calibration observer reads the attention
            merger.set_padding(mask.to(first_block.layer_norm1.weight.device).bool())

    hooks = [vision.register_forward_pre_hook(vision_pre, with_kwargs=True),
             first_block.register_forward_pre_hook(block_pre)]
    if head is not None:
        head_mask = CallArgument.of(head, "attention_mask")

        def head_pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            hidden = args[0] if args else kwargs.get("hidden_state")
            if not merger.padded or hidden is None or merger.pooling_weights(hidden) is None:
                return None
            return head_mask.replace(args, kwargs, None), kwargs

        hooks.append(head.register_forward_pre_hook(head_pre, with_kwargs=True))
    return hooks


def _classifier_hooks(model: nn.Module, merger: BlockMerger) -> list[Removable]:
    """A classifier's forward averages the tower's tokens itself: they come back on the patch grid within its call
    (:mod:`.unmerge`), so each mean is one over the original patches (CLIP's over the patch tokens, SigLIP's over
    all, SigLIP 2's over the real ones by the unmerged padding mask), of every patch's own residual stream
    (``unmerge="residual"``, normed by SigLIP's final norm after) or of its token (``"copy"``: the size-weighted
    mean of the tokens). With ``size_weighted_pool=False`` the head averages the merged tokens; SigLIP 2's
    padding mask cannot be applied to those, so a call with one is then refused."""
    padding_mask = CallArgument.of(model, "pixel_attention_mask") if _is_siglip2(model) else None

    def refuse_unmergeable_mask(args: tuple, kwargs: dict) -> None:
        if padding_mask is not None and not merger.size_weighted_pool and merger.merges() \
                and padding_mask.get(args, kwargs) is not None:
            raise ValueError(f"{type(model).__name__} averages its tokens by the pixel_attention_mask made for "
                             "the unmerged tokens: with size_weighted_pool=False they stay merged and it cannot; "
                             "set handle.size_weighted_pool = True, or call it without a mask (no padding)")

    # SigLIP's tower norms its output (the residual unmerge goes in before that norm); CLIP's returns the stream
    norm = None if hasattr(tower(model).embeddings, "class_embedding") else _post_layernorm(model)
    return unmerged_within_call(model, tower(model), merger, before=refuse_unmergeable_mask, norm=norm)


def _post_layernorm(model: nn.Module) -> nn.Module:
    """A SigLIP / SigLIP 2 tower's final norm, where a classifier's residual unmerge puts each patch's stream back."""
    norm = getattr(tower(model), "post_layernorm", None)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"{type(model).__name__}'s tower has no final norm named post_layernorm, where quickmerge "
                        "puts the residual stream back on the patch grid: this transformers release is not supported")
    return norm


def _proportional_pooling(vision: nn.Module, final_norm: nn.Module, attention: nn.MultiheadAttention,
                          merger: BlockMerger) -> list[Removable]:
    """Hooks adding log(size) to the pooling head's attention logits (``attn_mask [B * heads, 1, N]``), within a
    call of the tower ``vision``, which holds the head.

    Only for the keys the final norm returned in this pass, whose sizes the merger holds; a mask the
    head was given by someone else is refused rather than replaced."""
    final = LastOutput(final_norm, owner=vision, keep_input=False)

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
