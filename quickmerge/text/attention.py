"""SDPA that keeps grouped-query attention when a press adds a float mask.

Proportional attention reaches the attention logits as an additive float mask. Given any
mask, transformers' ``sdpa`` path repeats every key and value head up to the query heads
(``repeat_kv``) before calling ``scaled_dot_product_attention``: on SmolLM2 (9 query, 3 KV
heads) that copies the whole cache three times per layer and per decoded token, which made
a decode step on the 50%-merged cache slower than on the full one. On the CPU, PyTorch's
fused kernel takes a float mask *and* ``enable_gqa`` together, so no copy is needed.

While a press that adds a bias is active on an ``sdpa`` model, :func:`grouped_sdpa` makes the
model's attention (and mask) implementation ``"quickmerge_sdpa"``: this function for CPU
tensors with a float mask and grouped heads, transformers' own ``sdpa`` for everything else
(GPU tensors included, where PyTorch's GQA-with-mask path falls back to its math kernel).
The previous implementation is restored on exit.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoder import base_model

NAME = "quickmerge_sdpa"


def _sdpa_keeping_groups(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """``query [B, H, q, D]``, ``key``/``value [B, Hkv, k, D]`` -> ``([B, q, H, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" and key.shape[1] > 1 and key.stride(1) == 0 and attention_mask is not None:
        # KV heads that are one row (the flat layout, quickmerge.text.flat): spread it over the query heads as a
        # view, where transformers' path would copy it once per query head
        key, value = (t[:, :1].expand(-1, query.shape[1], -1, -1) for t in (key, value))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    grouped = query.shape[1] != key.shape[1]
    if (attention_mask is None or attention_mask.dtype == torch.bool or not grouped
            or query.device.type != "cpu" or kwargs.get("s_aux") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask[..., : key.shape[-2]],
                                         dropout_p=dropout, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, _sdpa_keeping_groups)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def decoder_config(model: nn.Module) -> Any:
    """The config the decoder's attention reads its implementation from: a vision-language model's text config (its
    decoder may run another implementation than its tower, e.g. PaliGemma 2's eager Gemma 2 beside an SDPA SigLIP,
    which the model's own config does not say: it names one implementation for all)."""
    return getattr(base_model(model), "config", None) or model.config


def attention_implementation(model: nn.Module) -> str | None:
    """The attention implementation ``model``'s decoder layers run (:func:`decoder_config`'s)."""
    return getattr(decoder_config(model), "_attn_implementation", None)


@contextlib.contextmanager
def decoder_attention_as(model: nn.Module, name: str) -> Iterator[None]:
    """Within the block ``model``'s decoder runs attention ``name``: only the decoder's config is set, and restored on
    exit (a vision-language model's tower keeps its own; the model-wide setter would set, then restore, one for all)."""
    config = decoder_config(model)
    before = getattr(config, "_attn_implementation", None)
    if before == name:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def grouped_sdpa(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within the block, ``model``'s decoder (where it runs ``sdpa``) attends through :func:`_sdpa_keeping_groups`
    (:func:`decoder_attention_as`); a decoder running another implementation is left as it is."""
    if attention_implementation(model) != "sdpa":
        return contextlib.nullcontext()
    _register()
    return decoder_attention_as(model, NAME)


def is_sdpa(implementation: str | None) -> bool:
    """Whether an attention implementation name is SDPA (transformers' or ours)."""
    return implementation in ("sdpa", NAME)
