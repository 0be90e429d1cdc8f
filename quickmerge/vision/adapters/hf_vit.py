"""Hugging Face ViT and DINOv2 adapter.

``ViTLayer.forward`` runs ``attention(layernorm_before(x))``, adds the residual, then
``output(intermediate(layernorm_after(h)), h)``; ``Dinov2Layer`` runs
``h = drop_path(layer_scale1(attention(norm1(x)))) + x`` then
``drop_path(layer_scale2(mlp(norm2(h)))) + h``. Hooks between those pieces:

- the attention goes through a registered attention function (transformers'
  ``AttentionInterface``) that wraps the model's own one (eager or sdpa): it captures
  queries and keys and adds log(size) as the additive mask (proportional attention);
  the model's config is switched to it while patched and switched back on removal;
- ViT: ``layernorm_after`` pre-hook merges the residual stream ``h``; ``output`` pre-hook
  swaps in the merged residual for its residual argument;
- DINOv2: the residual merge of :mod:`.residual` (``norm2`` and ``layer_scale2``).
"""

from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from .protocol import BlockMerger, Removable
from .residual import block_end_hook, block_start_hook, norm_merge_hook, residual_merge_hooks

_FAMILIES = {
    "transformers.models.vit.modeling_vit": "ViTPreTrainedModel",
    "transformers.models.dinov2.modeling_dinov2": "Dinov2PreTrainedModel",
}
ATTENTION_NAME = "quickmerge_vit"
_STATE_ATTR = "_quickmerge_attention"


class HFViTAdapter:
    """Hugging Face ``ViTModel`` / ``ViTForImageClassification`` / ``Dinov2Model`` (and subclasses)."""

    name = "Hugging Face ViT / DINOv2"
    tested_classes = ("ViTModel", "ViTForImageClassification", "Dinov2Model")

    def matches(self, model: nn.Module) -> bool:
        return any(_FAMILIES.get(c.__module__) == c.__name__ for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # the [CLS] token; neither family has register tokens

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        encoder = getattr(_vit(model), "encoder", None)
        layers = list(getattr(encoder, "layer", []))
        if not layers or not all(_is_vit_layer(x) or _is_dinov2_layer(x) for x in layers):
            raise TypeError(f"{type(model).__name__} has no ViT or DINOv2 encoder layers to patch")
        return layers

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        AttentionInterface.register(ATTENTION_NAME, _merged_attention)
        config = _vit(model).config
        original = config._attn_implementation
        if original == ATTENTION_NAME:
            raise TypeError("this model's config already uses quickmerge's attention "
                            "(was it copied from a patched model?)")
        if original == "eager":
            inner = sys.modules[type(blocks[0].attention.attention).__module__].eager_attention_forward
        else:
            inner = ALL_ATTENTION_FUNCTIONS[original]
        hooks: list[Removable] = []
        for i, layer in enumerate(blocks):
            setattr(layer.attention.attention, _STATE_ATTR, (merger, inner))
            hooks += _attach_vit_layer(layer, i, merger) if _is_vit_layer(layer) else residual_merge_hooks(
                layer, i, merger, layer.norm2, layer.layer_scale2)
        config._attn_implementation_internal = ATTENTION_NAME
        return [*hooks, _RestoreAttention(config, original, [layer.attention.attention for layer in blocks])]


class _RestoreAttention:
    """Puts the config's attention implementation back and forgets the merger."""

    def __init__(self, config: Any, original: str, modules: list[nn.Module]) -> None:
        self.config, self.original, self.modules = config, original, modules

    def remove(self) -> None:
        self.config._attn_implementation_internal = self.original
        for module in self.modules:
            if hasattr(module, _STATE_ATTR):
                delattr(module, _STATE_ATTR)


def _vit(model: nn.Module) -> nn.Module:
    for name in ("vit", "dinov2"):
        if hasattr(model, name):
            return getattr(model, name)
    return model


def _is_vit_layer(layer: nn.Module) -> bool:
    return all(hasattr(layer, a) for a in ("layernorm_after", "output", "attention"))


def _is_dinov2_layer(layer: nn.Module) -> bool:
    return all(hasattr(layer, a) for a in ("norm2", "mlp", "layer_scale2", "attention"))


def _merged_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    """Registered attention function: capture q/k, add log(size), call the model's own attention."""
    state = getattr(module, _STATE_ATTR, None)
    if state is None:
        raise RuntimeError(f"attention implementation {ATTENTION_NAME!r} used by a model quickmerge has not patched")
    merger, inner = state
    merger.record_qk(q=query, k=key, scale=kwargs.get("scaling") or query.shape[-1] ** -0.5)
    bias = merger.attention_bias(query)
    if bias is not None:
        attention_mask = bias if attention_mask is None else attention_mask + bias
    return inner(module, query, key, value, attention_mask, **kwargs)


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
