"""Hugging Face ViT, DeiT, DINOv2, DINOv2-with-registers and DINOv3 adapter, the self-supervised ViTs built from
ViT's layer (I-JEPA, MSN, MAE), and the video transformers built from it, VideoMAE and ViViT (transformers 5.x, both
layer layouts).

Up to transformers 5.2x, ``ViTLayer.forward`` runs ``attention(layernorm_before(x))``
(``attention.attention`` holding the projections), adds the residual, then
``output(intermediate(layernorm_after(h)), h)``; from 5.2x on it runs
``h = dropout(attention(layernorm_before(x))) + x`` then ``dropout(mlp(layernorm_after(h))) + h``
and the layers sit in ``vit.layers``. ``Dinov2Layer`` runs
``h = drop_path(layer_scale1(attention(norm1(x)))) + x`` then
``drop_path(layer_scale2(mlp(norm2(h)))) + h``. DeiT's layers are ViT's, DINOv2 with registers' and DINOv3's are
DINOv2's; their distillation and register tokens sit after the class token and are never merged. I-JEPA's, MSN's
and MAE's layers are ViT's; I-JEPA has no class token, MAE's encoder runs on the patches its random mask keeps.
VideoMAE's layers are ViT's older ones in every 5.x release, ViViT's the older ones up to 5.5 and the newer ones by
5.12; their tokens are tubelets (frames x patches), VideoMAE's without a class token.
DINOv3 rotates its patch tokens' queries and keys by a rotary table (cos, sin) handed to every layer
as ``position_embeddings``: a layer pre-hook merges it with the tokens (:mod:`.rotary`); the
attention function captures the rotated queries and keys.
Hooks between those pieces:

- the attention goes through a registered attention function (transformers'
  ``AttentionInterface``) that wraps the model's own one (eager or sdpa): it captures
  queries and keys and adds log(size) as the additive mask (proportional attention);
  the model's config is switched to it while patched and switched back on removal;
- old ViT layout: ``layernorm_after`` pre-hook merges the residual stream ``h``; ``output``
  pre-hook swaps in the merged residual for its residual argument;
- new ViT layout and DINOv2: the residual merge of :mod:`.residual` (``layernorm_after`` /
  ``norm2`` where the stream is merged, the branch's last module: ``dropout`` /
  ``layer_scale2``);
- heads that read every patch token of the base model's output in their own forward, DINOv2's classifiers (the
  class token beside the mean of the patch tokens), I-JEPA's (the mean of every token) and masked image modeling
  (pixels decoded from the tokens reshaped onto the grid), VideoMAE's classifier (the mean of the tokens, or token 0
  without mean pooling) and the pre-training decoders of VideoMAE and MAE (a token on every visible patch or
  tubelet, put back in place): within the head's call the base model's tokens go
  back on the patch grid (:mod:`.unmerge`), so the mean is over the original patches and every patch is decoded
  (with the residual unmerge, the default, from the stream before the final norm, each patch's own part of it
  added back).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .protocol import BlockMerger, Removable
from .residual import block_end_hook, block_start_hook, norm_merge_hook, residual_merge_hooks
from .rotary import check_takes_table, rotary_table_hook
from .unmerge import unmerged_within_call

# module of each family -> its pre-trained base class
_FAMILIES = {
    "transformers.models.vit.modeling_vit": "ViTPreTrainedModel",
    "transformers.models.deit.modeling_deit": "DeiTPreTrainedModel",
    "transformers.models.dinov2.modeling_dinov2": "Dinov2PreTrainedModel",
    "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers": "Dinov2WithRegistersPreTrainedModel",
    "transformers.models.dinov3_vit.modeling_dinov3_vit": "DINOv3ViTPreTrainedModel",
    "transformers.models.videomae.modeling_videomae": "VideoMAEPreTrainedModel",
    "transformers.models.vivit.modeling_vivit": "VivitPreTrainedModel",
    "transformers.models.ijepa.modeling_ijepa": "IJepaPreTrainedModel",
    "transformers.models.vit_msn.modeling_vit_msn": "ViTMSNPreTrainedModel",
    "transformers.models.vit_mae.modeling_vit_mae": "ViTMAEPreTrainedModel",
}
# where the heads keep the base model
_BASE_ATTRS = ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "videomae", "vivit", "ijepa")
# heads that classify the plain mean of the patch tokens (beside the class token, DINOv2's), in their own forward
_MEAN_POOLING_HEADS = ("Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification",
                       "IJepaForImageClassification")
# heads that reshape the patch tokens onto the grid in their own forward (pixels decoded per patch; MAE's decoder
# puts each visible patch's token back in its place)
_GRID_HEADS = ("ViTForMaskedImageModeling", "DeiTForMaskedImageModeling", "VideoMAEForPreTraining",
               "ViTMAEForPreTraining")
# a head that averages the tokens (mean pooling, the default) or reads token 0, a tubelet, as its config says
_VIDEO_CLASSIFIERS = ("VideoMAEForVideoClassification",)
# heads that put every patch token back on its grid position (feature maps, pixel reconstruction); refused unless
# a backbone of _STAGE_BACKBONES or a head of _GRID_HEADS
_DENSE_HEADS = ("Backbone", "ForMaskedImageModeling")
# backbones -> their module returning the hidden states they make feature maps of (those go back on the grid)
_STAGE_BACKBONES = {"Dinov2Backbone": "encoder", "Dinov2WithRegistersBackbone": "encoder", "DINOv3ViTBackbone": "model"}
ATTENTION_NAME = "quickmerge_vit"
_STATE_ATTR = "_quickmerge_attention"
# The model's attention implementations the patch wraps. Flash attention's are not among them: transformers
# looks its kernel up by the config's implementation name, which is quickmerge's while patched.
SUPPORTED_ATTENTION = ("eager", "sdpa", "flex_attention")
# Those that add a float mask to the logits, as proportional attention needs. transformers' flex_attention
# takes one too, but with torch 2.14 on the CPU its compiled kernel crashes the process on it.
TAKES_FLOAT_MASK = ("eager", "sdpa")


class HFViTAdapter:
    """Hugging Face ViT, DeiT, DINOv2, DINOv2-with-registers, DINOv3 ViT, I-JEPA, ViT-MSN, ViT-MAE, VideoMAE and
    ViViT models (and subclasses)."""

    name = "Hugging Face ViT / DeiT / DINOv2 / DINOv3 / I-JEPA / MSN / MAE / VideoMAE / ViViT"
    tested_classes = ("ViTModel", "ViTForImageClassification", "DeiTModel", "DeiTForImageClassification",
                      "DeiTForImageClassificationWithTeacher", "Dinov2Model", "Dinov2ForImageClassification",
                      "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification", "DINOv3ViTModel",
                      "IJepaModel", "IJepaForImageClassification", "ViTMSNModel", "ViTMSNForImageClassification",
                      "ViTMAEModel", "VideoMAEModel", *_VIDEO_CLASSIFIERS, "VivitModel",
                      "VivitForVideoClassification", *_STAGE_BACKBONES, *_GRID_HEADS)

    def matches(self, model: nn.Module) -> bool:
        return any(_FAMILIES.get(c.__module__) == c.__name__ for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """[CLS] (none in VideoMAE), then DeiT's distillation token or DINOv2's register tokens."""
        embeddings = _vit(model).embeddings
        registers = getattr(embeddings, "register_tokens", None)
        return (int(self.has_class_token(model)) + int(hasattr(embeddings, "distillation_token"))
                + (0 if registers is None else registers.shape[1]))

    def has_class_token(self, model: nn.Module) -> bool:
        return hasattr(_vit(model).embeddings, "cls_token")

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return activation_checkpointing(model) and model.training

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        if _is_stage_backbone(model):
            if _stage_encoder(model) is None:  # DINOv3ViTBackbone up to transformers 5.3 gathers them in its loop
                raise TypeError(f"{type(model).__name__} has no encoder module returning the hidden states its "
                                "feature maps are made of, where quickmerge would put them back on the patch grid "
                                "(DINOv3ViTBackbone has one from transformers 5.4 on): upgrade "
                                "transformers, or run it unpatched")
        elif not _has_head(model, _GRID_HEADS) and any(c.__name__.endswith(_DENSE_HEADS) for c in type(model).__mro__):
            raise TypeError(
                f"{type(model).__name__} puts every patch token back on the patch grid (feature maps or pixels), "
                "where merged tokens have no place: merge tokens in a model that pools them (the family's ...Model "
                "or ...ForImageClassification), a DINOv2 / DINOv3 backbone or ViT / DeiT masked image modeling "
                "(which get them unmerged), or run this one unpatched")
        if _has_head(model, (*_GRID_HEADS, *_MEAN_POOLING_HEADS, *_VIDEO_CLASSIFIERS)):
            _final_norm(model)  # refused here, before any hook, if a release renamed it
        base = _vit(model)
        if _has_head(base, ("IJepaModel",)) and getattr(base, "pooler", None) is not None:
            raise TypeError(f"{type(model).__name__}'s pooler reads the first patch token (I-JEPA has no class "
                            "token), which merging averages with others: build it with add_pooling_layer=False "
                            "(IJepaModel's default) and pool the tokens yourself, or run it unpatched")
        layers = _layers(base)
        if not layers or not all(_has_output_module(x) or _residual_parts(x) is not None for x in layers):
            raise TypeError(f"{type(model).__name__} has no ViT, DeiT, DINOv2/v3, I-JEPA, MSN or MAE encoder layers "
                            "to patch")
        if hasattr(base, "rope_embeddings"):  # DINOv3
            check_takes_table(layers, "position_embeddings")
        attention_implementation(base.config)
        return layers

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        hooks = attach_attention_and_layers(_vit(model).config, [_attention_module(layer) for layer in blocks],
                                            blocks, merger, parts=_residual_parts)
        if hasattr(_vit(model), "rope_embeddings"):  # DINOv3's (cos, sin) per patch: merged after the start hook
            hooks += [rotary_table_hook(layer, "position_embeddings", merger) for layer in blocks]
        if _has_head(model, _MEAN_POOLING_HEADS):
            hooks += unmerged_within_call(model, _vit(model), merger, norm=_final_norm(model))
        elif _has_head(model, _VIDEO_CLASSIFIERS):  # averages the stream itself (no final norm), or reads token 0
            pools = getattr(model, "fc_norm", None) is not None
            hooks += unmerged_within_call(model, _vit(model), merger, pools=pools, norm=_final_norm(model))
        elif _has_head(model, _GRID_HEADS):
            hooks += unmerged_within_call(model, _vit(model), merger, pools=False, norm=_final_norm(model))
        if _is_stage_backbone(model):
            hooks += [merger.dense_head(), _stages_on_the_grid(_stage_encoder(model), merger)]
        else:
            hooks.append(hidden_states_check(model, merger))
        return hooks


def hidden_states_check(model: nn.Module, merger: BlockMerger) -> Removable:
    """Forward hook on a patched model refusing ``hidden_states`` that do not hold each block's merged tokens.

    quickmerge gives a merging block its merged output in a forward hook of its own (the block's code still sums
    the unmerged stream, without the MLP branch). transformers 5.2 and later record hidden states by forward hooks,
    which see the merged output (quickmerge's hook runs first); 5.0 records a layer's output inside its
    forward, before any hook: those would come back of the wrong length and wrong, so they are refused."""

    def model_post(_m: nn.Module, _args: tuple, out: Any) -> None:
        states = getattr(out, "hidden_states", None)
        if not states or merger.sizes is None:
            return
        expected = [*merger.tokens_per_layer[1:], merger.sizes.shape[1]]
        if [h.shape[1] for h in states[1:]] != expected:
            raise RuntimeError(f"{type(model).__name__} recorded hidden states of {[h.shape[1] for h in states]} "
                               f"tokens where its merged blocks passed on {merger.tokens_per_layer[:1] + expected}: "
                               "this transformers records each layer's output before quickmerge's hooks replace it "
                               "with the merged one (as transformers 5.0 does); upgrade to 5.2 or later, or call "
                               "without output_hidden_states")

    return model.register_forward_hook(model_post)


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The base model's norm after the last block (``layernorm`` in ViT and DeiT), where the residual unmerge of
    a masked-image-modeling head puts the stream back on the grid; None where the base model returns the stream
    itself (VideoMAE with mean pooling sets ``layernorm = None``; its head norms the mean)."""
    base = _vit(model)
    if _has_head(model, (*_VIDEO_CLASSIFIERS, "VideoMAEForPreTraining")) and hasattr(base, "layernorm") \
            and base.layernorm is None:
        return None
    norm = getattr(base, "layernorm", None)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"{type(model).__name__}'s base model has no final norm named layernorm, where quickmerge "
                        "puts the residual stream back on the patch grid: this transformers release is not supported")
    return norm


def _has_head(model: nn.Module, names: tuple[str, ...]) -> bool:
    return any(c.__name__ in names for c in type(model).__mro__)


def _is_stage_backbone(model: nn.Module) -> bool:
    return any(c.__name__ in _STAGE_BACKBONES for c in type(model).__mro__)


def _stage_encoder(model: nn.Module) -> nn.Module | None:
    """The module of a stage backbone whose output holds the hidden states of every stage, or None."""
    name = next(_STAGE_BACKBONES[c.__name__] for c in type(model).__mro__ if c.__name__ in _STAGE_BACKBONES)
    encoder = getattr(model, name, None)
    return encoder if isinstance(encoder, nn.Module) and _layers(encoder) else None


def _stages_on_the_grid(encoder: nn.Module, merger: BlockMerger) -> Removable:
    """Forward hook on a backbone's encoder putting its hidden states back on the patch grid.

    A backbone (DINOv2's under DPT or Depth Anything, DINOv3's) reshapes the hidden states of its chosen stages into
    feature maps ``[B, C, H, W]`` in its own forward, which needs a row for every patch. Entry ``j`` of the
    encoder's ``hidden_states`` (the tokens entering block ``j``; the last, the last block's output) and
    ``last_hidden_state`` are expanded to the patch grid, each patch carrying the token it was merged into in that
    stage (:meth:`~quickmerge.vision.patch.MergeHandle.expand_to_patches`), plus, with the handle's
    ``unmerge="residual"`` (default), what its own residual stream lost at each merge before (the hidden states are
    the stream itself; the backbone norms them after). The blocks themselves still run on the merged tokens."""

    def encoder_post(_m: nn.Module, _args: tuple, out: Any) -> Any:
        if not hasattr(out, "last_hidden_state"):
            raise TypeError(f"{type(encoder).__name__} returned a {type(out).__name__}, not a model output whose "
                            "hidden states quickmerge can put back on the patch grid")
        residual = merger.unmerge == "residual"
        last = merger.expand_to_patches(out.last_hidden_state, residual=residual)
        if last is None:  # nothing merged
            return None
        states = getattr(out, "hidden_states", None)
        if states is not None:
            if len(states) != merger.num_layers + 1:
                raise RuntimeError(f"{type(encoder).__name__} returned {len(states)} hidden states for "
                                   f"{merger.num_layers} blocks; quickmerge expects the blocks' inputs and the last "
                                   "output")
            try:
                out.hidden_states = tuple(merger.expand_to_patches(h, j, residual) for j, h in enumerate(states))
            except ValueError as error:
                raise RuntimeError(f"{type(encoder).__name__}'s hidden states do not hold each block's merged tokens "
                                   f"({error}): this transformers records each layer's output before quickmerge's "
                                   "hooks replace it with the merged one; upgrade transformers") from error
        out.last_hidden_state = last
        return out

    return encoder.register_forward_hook(encoder_post)


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model recomputes its layers in the backward pass.

    transformers 5.24 renamed ``is_gradient_checkpointing`` to ``is_activation_checkpointing`` (the old
    name warns on every read and goes in v6); the newer name is read where the class has it. Both read
    the ``gradient_checkpointing`` flag the enabling call sets on the layers, read directly where a
    model has neither name."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            value = getattr(model, name)  # a property in 5.x; called should a release make it a method
            return bool(value() if callable(value) else value)
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def attach_attention_and_layers(
    config: Any,
    attentions: list[nn.Module],
    blocks: list[nn.Module],
    merger: BlockMerger,
    parts: Callable[[nn.Module], tuple[nn.Module, nn.Module] | None],
) -> list[Removable]:
    """Route ``attentions`` through :func:`_merged_attention` and hook each block's residual merge:
    :func:`.residual.residual_merge_hooks` with ``parts(block) = (norm, branch_end)``, or the older
    ViT layout's hooks where ``parts`` gives None."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTENTION_NAME, _merged_attention)
    # transformers builds a padding mask only for implementations its mask registry knows (else it silently
    # passes none): the wrapped implementation's mask is built for this one
    AttentionMaskInterface.register(ATTENTION_NAME, _wrapped_implementation_mask)
    original = attention_implementation(config)
    if merger.prop_attn:
        check_float_mask(original)
    if original == "eager":
        inner = sys.modules[type(attentions[0]).__module__].eager_attention_forward
    else:
        inner = ALL_ATTENTION_FUNCTIONS[original]
    hooks: list[Removable] = []
    for i, (layer, attention) in enumerate(zip(blocks, attentions, strict=True)):
        setattr(attention, _STATE_ATTR, (merger, inner, original))
        found = parts(layer)
        hooks += _attach_vit_layer(layer, i, merger) if found is None else residual_merge_hooks(
            layer, i, merger, *found)
    config._attn_implementation_internal = ATTENTION_NAME
    _WRAPPED[id(config)] = original
    return [*hooks, _RestoreAttention(config, original, attentions)]


# id(config) -> the attention implementation quickmerge wraps, for each patched model's config
_WRAPPED: dict[int, str] = {}


def _wrapped_implementation_mask(*args: Any, config: Any = None, **kwargs: Any) -> Any:
    """transformers' mask function for a patched config: for a padding mask, the one of the implementation
    quickmerge wraps (``eager``: a float mask, ``sdpa``: a boolean one), so the model's masks are what unpatched
    it gets; without padding none (a full mask of the unmerged length, flex attention's, would not fit the merged
    tokens; an encoder attends everywhere either way)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    if kwargs.get("attention_mask") is None:
        return None
    original = _WRAPPED.get(id(config))
    if original is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} asked for a mask for a config quickmerge "
                           "has not patched")
    return ALL_MASK_ATTENTION_FUNCTIONS[original](*args, config=config, **kwargs)


def attention_implementation(config: Any) -> str:
    """The model's attention implementation, checked to be one the patch can wrap (before any hook)."""
    original = config._attn_implementation
    if original == ATTENTION_NAME:
        raise TypeError("this model's config already uses quickmerge's attention "
                        "(was it copied from a patched model?)")
    if original not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"quickmerge.patch wraps the attention implementations {', '.join(SUPPORTED_ATTENTION)}; this model "
            f"uses {original!r}: load it with attn_implementation='sdpa' (or call model.set_attn_implementation("
            "'sdpa')) before patching"
        )
    return original


class _RestoreAttention:
    """Puts the config's attention implementation back and forgets the merger."""

    def __init__(self, config: Any, original: str, modules: list[nn.Module]) -> None:
        self.config, self.original, self.modules = config, original, modules

    def remove(self) -> None:
        self.config._attn_implementation_internal = self.original
        _WRAPPED.pop(id(self.config), None)
        for module in self.modules:
            if hasattr(module, _STATE_ATTR):
                delattr(module, _STATE_ATTR)


def _vit(model: nn.Module) -> nn.Module:
    for name in _BASE_ATTRS:
        if hasattr(model, name):
            return getattr(model, name)
    return model


def _layers(base: nn.Module) -> list[nn.Module]:
    """The encoder layers: ``encoder.layer`` (ViT up to 5.2x, DeiT, DINOv2), ``layers`` (newer ViT), ``layer``
    (DINOv3 up to 5.2x) or ``model.layer`` (DINOv3's encoder, later)."""
    for path in (("encoder", "layer"), ("layers",), ("layer",), ("model", "layer")):
        found: Any = base
        for name in path:
            found = getattr(found, name, None)
        if isinstance(found, nn.ModuleList) and len(found):
            return list(found)
    return []


def _attention_module(layer: nn.Module) -> nn.Module:
    """The module that calls the attention function (``attention.attention`` in the older layout)."""
    inner = getattr(layer.attention, "attention", None)
    return inner if isinstance(inner, nn.Module) else layer.attention


def _has_output_module(layer: nn.Module) -> bool:
    """The older ViT layout: the residual is added inside ``layer.output``."""
    return all(hasattr(layer, a) for a in ("layernorm_after", "output", "attention"))


def _residual_parts(layer: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(norm, branch_end)`` of a layer that adds its MLP branch itself (DINOv2, newer ViT), else None."""
    if all(hasattr(layer, a) for a in ("norm2", "mlp", "layer_scale2", "attention")):
        return layer.norm2, layer.layer_scale2
    if all(hasattr(layer, a) for a in ("layernorm_after", "mlp", "dropout", "attention")) and not hasattr(
        layer, "output"
    ):
        # dropout also follows the attention, but only its call after the MLP finds a merged stream
        return layer.layernorm_after, layer.dropout
    return None


def _merged_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """Registered attention function: capture q/k, add log(size), call the model's own attention.

    Takes ``dropout`` where transformers' ``sdpa_attention_forward`` does: importing kvpress wraps every
    registered attention function, this one too, in a wrapper that passes it by position."""
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} used by a model quickmerge has not patched")
    merger, inner, implementation = state
    merger.record_qk(q=query, k=key, scale=kwargs.get("scaling") or query.shape[-1] ** -0.5)
    bias = merger.attention_bias(query)
    if bias is not None:
        check_float_mask(implementation)  # prop_attn may have been turned on after patching
        # with padding the model's mask is the padding's, made for the unmerged tokens: the bias masks it itself
        attention_mask = bias if attention_mask is None or merger.has_padding() else attention_mask + bias
    return inner(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def check_float_mask(implementation: str) -> None:
    """Raise unless ``implementation`` adds a float mask to the attention logits (proportional attention; the
    one padded family, SigLIP 2, has no flex attention)."""
    if implementation not in TAKES_FLOAT_MASK:
        raise ValueError(
            f"proportional attention (prop_attn=True) adds log(size) to the attention logits as a float mask, "
            f"which attention implementation {implementation!r} does not take (only {', '.join(TAKES_FLOAT_MASK)} "
            "do); load the model with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')), "
            "or patch with prop_attn=False"
        )


def _attach_vit_layer(layer: nn.Module, index: int, merger: BlockMerger) -> list[Removable]:
    merged: dict[str, Tensor | None] = {"residual": None}

    def clear() -> None:
        merged["residual"] = None

    def output_pre(_m: nn.Module, args: tuple) -> tuple | None:
        if merged["residual"] is None:
            return None
        residual, merged["residual"] = merged["residual"], None
        return (args[0], residual, *args[2:])

    return [
        block_start_hook(layer, index, merger, on_start=clear),
        norm_merge_hook(layer.layernorm_after, index, merger, merged),
        layer.output.register_forward_pre_hook(output_pre),
        block_end_hook(layer, index, merger),
    ]
