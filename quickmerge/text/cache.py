"""The compressed cache: what a press leaves behind in a Hugging Face ``DynamicCache``.

A press replaces each layer it compressed by a :func:`merged_layer` (a ``DynamicLayer``
subclass, holding the kept entries) that remembers what it stands for:

- ``offset``: prompt tokens minus entries kept. The layer reports its *logical* length
  (entries + offset) as its sequence length and places its entries at positions
  ``offset ..`` in the masks transformers builds, so new tokens get the right positions and
  causal masks with or without the press, in every transformers release (5.2 builds masks
  from ``cache_position``, 5.24 from the layers' query offsets).
- ``log_sizes``: ``[B, H, 1, K]`` log of the number of prompt entries each kept entry
  stands for (None: one each). The press adds it to the attention logits while active
  (proportional attention); decoding outside the press runs without it.
- ``positions``: ``[B, K]`` the position each entry sits at (input-side merging, whose
  upper layers need masks built by position; decoding such a cache needs the press).
- ``decoded_queries``: ``[B, H, w, d]`` the last queries decoded into the layer, buffered for
  its next merge while decoding (:mod:`quickmerge.text.decoding`).

Every batch reindexing (beam search's ``reorder_cache``, ``batch_select_indices``,
``batch_repeat_interleave``) carries the per-row state with the rows.

Only the plain ``DynamicLayer`` of a ``DynamicCache`` can be compressed; other cache layers
(static, quantized, offloaded) raise :class:`UnsupportedCacheError`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from torch import Tensor

from . import flat

DYNAMIC = ("DynamicLayer", "LinearAttentionAndFullAttentionLayer")  # the latter: Falcon-H1's attention + Mamba layers
DYNAMIC_OR_SLIDING = (*DYNAMIC, "DynamicSlidingWindowLayer")
ROW_STATE = ("log_sizes", "positions", "decoded_queries")  # a merged layer's tensors with one row per batch row


class UnsupportedCacheError(NotImplementedError):
    """The cache handed to a press cannot be compressed in place (not a TypeError: see
    :class:`~quickmerge.text.decoder.UnsupportedAttentionError`)."""


def cache_arg(kwargs: dict) -> Any:
    """The cache an attention or decoder layer was called with (``cache=`` since transformers
    5.2x, ``past_key_values=`` before; GPT-NeoX's attention: ``layer_past=``), or None."""
    for name in ("cache", "past_key_values", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for calling ``model`` (a causal LM or its decoder stack) with ``cache``, under the
    keyword its transformers release takes: ``cache=`` (5.24 on; ``past_key_values=`` is deprecated there,
    to be removed in 5.40) or ``past_key_values=`` (before)."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(model_type: type) -> str:
    parameters = inspect.signature(model_type.forward).parameters
    if "cache" in parameters:
        return "cache"
    if "past_key_values" in parameters:
        return "past_key_values"
    if "layer_past" in parameters:  # GPT-NeoX's attention
        return "layer_past"
    raise TypeError(f"{model_type.__name__}.forward takes neither cache= nor past_key_values=: it keeps no KV cache")


def own_cache_class(model: Any) -> str | None:
    """The name of a cache class of a model's own, one that is no transformers ``Cache`` and keeps no layers (what
    hybrid models used before their states became ``DynamicCache`` layers: Qwen 3.5, LFM2 and the state-space hybrids
    before transformers 5.5, OLMo Hybrid before 5.15), defined beside the model's decoder; None if there is none."""
    import sys

    from transformers.cache_utils import Cache

    module = sys.modules.get(type(model).__module__)
    for name, value in sorted(vars(module).items() if module is not None else ()):
        if (isinstance(value, type) and "Cache" in name and value.__module__ == module.__name__
                and not issubclass(value, Cache)):
            return name
    return None


def check_cache(cache: Any, who: str) -> None:
    """Raise :class:`UnsupportedCacheError` for caches whose layers cannot be rewritten in place (offloaded) or
    that keep no layers at all."""
    if not hasattr(cache, "layers"):
        raise UnsupportedCacheError(
            f"{who} compresses the layers of a transformers Cache; this {type(cache).__name__} keeps none (a hybrid "
            "model's own cache class, as Qwen 3.5 has before transformers 5.5): use transformers 5.5 or later"
        )
    if getattr(cache, "offloading", False):
        raise UnsupportedCacheError(
            f"{who} cannot compress an offloaded cache (DynamicCache(offloading=True)); use a plain DynamicCache()"
        )


def check_compressible(cache: Any, layer: Any, who: str, allowed: tuple[str, ...] = DYNAMIC) -> None:
    """Raise :class:`UnsupportedCacheError` unless ``layer`` of ``cache`` is one of the ``allowed``
    dynamic layer classes (or was merged already) and the cache is resident."""
    check_cache(cache, who)
    name = type(layer).__name__
    if name not in allowed and not is_merged(layer):
        raise UnsupportedCacheError(
            f"{who} compresses the layers of a DynamicCache in place; this cache ({type(cache).__name__}) has "
            f"{name} layers, which it cannot shorten (static, quantized and offloaded caches are not "
            "supported). Pass cache=DynamicCache() (past_key_values= before transformers 5.24) or let the model "
            "create its default cache."
        )


def is_merged(layer: Any) -> bool:
    """Whether ``layer`` was compressed by a press."""
    return getattr(layer, "_quickmerge_merged", False)


def physical_length(layer: Any) -> int:
    """Entries a cache layer holds (its keys' length), whatever length it reports."""
    keys = getattr(layer, "keys", None) if layer is not None else None
    return 0 if keys is None or keys.dim() < 2 else keys.shape[-2]


@functools.cache
def _merged_layer_type(base: type) -> type:
    class MergedLayer(base):
        """A ``DynamicLayer`` holding a compressed prompt (see :mod:`quickmerge.text.cache`)."""

        _quickmerge_merged = True
        offset: int = 0
        log_sizes: Tensor | None = None
        positions: Tensor | None = None
        decoded_queries: Tensor | None = None
        needs_press: bool = False  # decoding needs the press's masks (several tokens, or a sliding window)
        window: int | None = None  # the attention's sliding window, whatever the cache layer's class says
        _press_call: bool = False  # set by the press just before each call that it handles
        folded_heads: int = 0  # flat layout (quickmerge.text.flat): the KV heads folded into one row
        prompt_length: int = 0  # flat layout: prompt tokens, and the entries that stand for them
        prompt_entries: int = 0

        def get_seq_length(self) -> int:
            entries = physical_length(self)
            if self.folded_heads:  # each token after the prompt added one entry per KV head
                return self.prompt_length + (entries - self.prompt_entries) // self.folded_heads
            return entries + self.offset if entries else 0

        def get_mask_sizes(self, query: Any, *args: Any, **kwargs: Any) -> tuple[int, int]:
            q_len = query if isinstance(query, int) else int(query.shape[0])
            return physical_length(self) + q_len, self.offset

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
            handled, self._press_call = self._press_call, False
            if self.folded_heads:
                return self._update_flat(key_states, value_states, handled, *args, **kwargs)
            if self.needs_press and not handled and (key_states.shape[-2] > 1 or self.window is not None):
                raise RuntimeError(
                    "this cache was compressed by QuickMergeInputPress, whose upper layers need the press's "
                    "attention masks (merged positions, sliding windows): decode inside `with press(model):` "
                    "(outside it, only one token per call on models without sliding-window layers)"
                )
            return super().update(key_states, value_states, *args, **kwargs)

        def _update_flat(self, keys: Tensor, values: Tensor, handled: bool, *args: Any, **kwargs: Any) -> Any:
            if not handled:
                raise RuntimeError(
                    "this cache was compressed with head_budgets=True: its KV heads share one row that only the "
                    "press's attention masks can read; decode inside `with press(model):`"
                )
            b, hkv, q_len, _ = keys.shape
            heads = self.log_sizes.shape[1]
            owners = (torch.arange(hkv * q_len, device=keys.device) // q_len).expand(b, -1)
            new = flat.owner_bias(torch.zeros(b, hkv * q_len, device=keys.device), owners, heads, hkv)
            self.log_sizes = torch.cat([self.log_sizes, new.to(self.log_sizes.dtype)], dim=-1)
            keys, values = super().update(flat.flatten_new(keys), flat.flatten_new(values), *args, **kwargs)
            return flat.as_heads(keys, hkv), flat.as_heads(values, hkv)

        def crop(self, *args: Any, **kwargs: Any) -> None:
            raise NotImplementedError("a cache compressed by quickmerge cannot be cropped (its entries are merged)")

        def reset(self) -> None:
            super().reset()
            self.offset, self.log_sizes, self.positions, self.decoded_queries = 0, None, None, None
            self.folded_heads = self.prompt_length = self.prompt_entries = 0

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            super().reorder_cache(beam_idx)
            self._index_batch(beam_idx)

        def batch_select_indices(self, indices: Tensor) -> None:
            super().batch_select_indices(indices)
            self._index_batch(indices)

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            for name in ROW_STATE:
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value.repeat_interleave(repeats, dim=0))

        def _index_batch(self, index: Tensor) -> None:
            for name in ROW_STATE:
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, value[index.to(value.device)])

    return MergedLayer


def merged_layer(layer: Any, keys: Tensor, values: Tensor, prompt_length: int) -> Any:
    """A merged layer holding ``keys``/``values`` ``[B, Hkv, K, d]`` for a prompt of ``prompt_length``
    tokens, carrying ``layer``'s other state (device, dtype, ...)."""
    kind = _merged_layer_type(type(layer).__mro__[1] if is_merged(layer) else type(layer))
    merged = kind.__new__(kind)
    merged.__dict__.update(layer.__dict__)
    merged.keys, merged.values = keys, values
    merged.offset = prompt_length - keys.shape[-2]
    merged.log_sizes = merged.positions = merged.decoded_queries = None
    merged.needs_press = merged._press_call = False
    merged.window = None
    merged.folded_heads = merged.prompt_length = merged.prompt_entries = 0
    return merged
