"""Hugging Face ViT and DINOv2 adapter for :func:`quickmerge.patch`.

``ViTLayer.forward`` runs ``attention(layernorm_before(x))``, adds the residual, then
``output(intermediate(layernorm_after(h)), h)``; ``Dinov2Layer`` runs
``h = drop_path(layer_scale1(attention(norm1(x)))) + x`` then
``drop_path(layer_scale2(mlp(norm2(h)))) + h``. Hooks between those pieces:

- the attention goes through a registered attention function (transformers'
  ``AttentionInterface``) that wraps the model's own one (eager or sdpa): it captures
  queries and keys and adds log(size) as the additive mask (proportional attention);
  the model's config is switched to it while patched and switched back by ``unpatch``;
- ViT: ``layernorm_after`` pre-hook merges the residual stream ``h``; ``output`` pre-hook
  swaps in the merged residual for its residual argument;
- DINOv2: ``norm2`` pre-hook merges ``h``; ``layer_scale2`` hook takes the MLP branch and
  hands the layer a zero (its residual add still holds the unmerged ``h``); the layer hook
  returns merged ``h`` + branch.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from ..vision.block_hooks import residual_merge_hooks

TESTED_CLASSES = ("ViTModel", "ViTForImageClassification", "Dinov2Model")
_FAMILIES = {
    "transformers.models.vit.modeling_vit": "ViTPreTrainedModel",
    "transformers.models.dinov2.modeling_dinov2": "Dinov2PreTrainedModel",
}
ATTENTION_NAME = "quickmerge_vit"
_STATE_ATTR = "_quickmerge_attention"


def matches(model: nn.Module) -> bool:
    return any(_FAMILIES.get(c.__module__) == c.__name__ for c in type(model).__mro__)


def num_prefix_tokens(model: nn.Module) -> int:
    return 1  # the [CLS] token; neither family has register tokens


def _vit(model: nn.Module) -> nn.Module:
    for name in ("vit", "dinov2"):
        if hasattr(model, name):
            return getattr(model, name)
    return model


def _is_vit_layer(layer: nn.Module) -> bool:
    return all(hasattr(layer, a) for a in ("layernorm_after", "output", "attention"))


def _is_dinov2_layer(layer: nn.Module) -> bool:
    return all(hasattr(layer, a) for a in ("norm2", "mlp", "layer_scale2", "attention"))


def blocks(model: nn.Module) -> list[nn.Module]:
    encoder = getattr(_vit(model), "encoder", None)
    layers = list(getattr(encoder, "layer", []))
    if not layers or not all(_is_vit_layer(x) or _is_dinov2_layer(x) for x in layers):
        raise TypeError(f"{type(model).__name__} has no ViT or DINOv2 encoder layers to patch")
    return layers


def _merged_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """Registered attention function: capture q/k, add log(size), call the model's own attention."""
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} used by a model quickmerge has not patched")
    handle, inner = state
    handle.record_qk(q=query, k=key, scale=kwargs.get("scaling") or query.shape[-1] ** -0.5)
    bias = handle.attention_bias(query)
    if bias is not None:
        attention_mask = bias if attention_mask is None else attention_mask + bias
    return inner(module, query, key, value, attention_mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _merged_attention)


def attach(model: nn.Module, found: list[nn.Module], handle: Any) -> list[Any]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    _register_attention()
    config = _vit(model).config
    original = config._attn_implementation
    if original == ATTENTION_NAME:
        raise TypeError("this model's config already uses quickmerge's attention (was it copied from a patched model?)")
    if original == "eager":
        inner = sys.modules[type(found[0].attention.attention).__module__].eager_attention_forward
    else:
        inner = ALL_ATTENTION_FUNCTIONS[original]
    handle._hf_original_attention = original
    hooks = []
    for i, layer in enumerate(found):
        setattr(layer.attention.attention, _STATE_ATTR, (handle, inner))
        hooks += _attach_layer(layer, i, handle) if _is_vit_layer(layer) else _attach_dinov2_layer(layer, i, handle)
    config._attn_implementation_internal = ATTENTION_NAME
    return hooks


def restore(model: nn.Module, handle: Any) -> None:
    _vit(model).config._attn_implementation_internal = handle._hf_original_attention
    for layer in blocks(model):
        if hasattr(layer.attention.attention, _STATE_ATTR):
            delattr(layer.attention.attention, _STATE_ATTR)


def _attach_layer(layer: nn.Module, index: int, handle: Any) -> list[Any]:
    merged: dict[str, Tensor | None] = {"residual": None}

    def layer_pre(_m: nn.Module, args: tuple) -> None:
        if index == 0:
            handle.begin(args[0])
        handle.enter_block(args[0])
        merged["residual"] = None

    def norm_pre(_m: nn.Module, args: tuple) -> tuple | None:
        out = handle.merge(index, args[0])
        if out is None:
            return None
        merged["residual"] = out
        return (out,)

    def output_pre(_m: nn.Module, args: tuple) -> tuple | None:
        if merged["residual"] is None:
            return None
        residual, merged["residual"] = merged["residual"], None
        return (args[0], residual, *args[2:])

    def layer_hook(_m: nn.Module, _args: tuple, _out: Any) -> None:
        if index == handle.num_layers - 1:
            handle.end()

    return [
        layer.register_forward_pre_hook(layer_pre),
        layer.layernorm_after.register_forward_pre_hook(norm_pre),
        layer.output.register_forward_pre_hook(output_pre),
        layer.register_forward_hook(layer_hook),
    ]


def _attach_dinov2_layer(layer: nn.Module, index: int, handle: Any) -> list[Any]:
    return residual_merge_hooks(layer, index, handle, layer.norm2, layer.layer_scale2)
