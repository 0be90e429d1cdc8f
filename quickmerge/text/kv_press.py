"""``KVPress``: the base of every KV-cache press, owning the hooks and the cache bookkeeping.

A press subclass says only *what* to keep: :meth:`KVPress.score` rates each cached entry,
:meth:`KVPress.merge` turns the prompt's keys and values into the kept ones (default:
keep the top-scored entries, i.e. eviction). Everything else lives here:

- prefill: a forward hook on each attention layer (transformers 5.x) reads the layer's
  freshly filled cache, calls ``score`` and ``merge`` and writes the shorter cache back;
  sliding-window layers (Gemma 3's local layers) are left alone;
- merged entries: each remembers how many entries it stands for; while the press is
  active, a pre-hook gives the attention ``log(size)`` on those entries' logits
  (proportional attention) through its additive mask, rebuilt for the shorter cache;
- positions: tokens decoded inside the ``with`` block continue from the original length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoder import base_model, cache_causal_mask, hidden_states_arg, is_prefill
from .press import Press


class Compressed(NamedTuple):
    """What :meth:`KVPress.merge` returns: ``[B, Hkv, kept, d]`` keys and values, and the
    number of prompt entries each kept entry stands for ``[B, Hkv, kept]`` (None: one each)."""

    keys: Tensor
    values: Tensor
    sizes: Tensor | None


@dataclass
class KVPress(Press):
    """Compress each attention layer's KV cache during prefill (see the module docstring).

    Subclasses override :meth:`score` and/or :meth:`merge` and add their own options as
    dataclass fields.
    """

    _bias: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)
    _flat: set[int] = field(default_factory=set, init=False, repr=False)
    _decoded: int = field(default=0, init=False, repr=False)

    # ---- what a press says --------------------------------------------------------------
    def score(
        self, module: nn.Module, hidden_states: Tensor, keys: Tensor, values: Tensor, kwargs: dict
    ) -> Tensor | None:
        """Score ``[B, Hkv, L]`` of each cached entry (higher = more worth keeping), or None."""
        return None

    def merge(self, keys: Tensor, values: Tensor, scores: Tensor | None, kept: int) -> Compressed:
        """``[B, Hkv, L, d]`` keys and values -> ``kept`` entries per head. Default: keep the
        top-scored entries in their order (eviction)."""
        if scores is None:
            raise NotImplementedError(f"{type(self).__name__} must override score() or merge()")
        index = scores.topk(kept, dim=-1).indices.sort(dim=-1).values[..., None]
        keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1]))
        values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1]))
        return Compressed(keys, values, None)

    # ---- hooks ---------------------------------------------------------------------------
    def _reset(self) -> None:
        super()._reset()
        self._bias, self._flat, self._decoded = {}, set(), 0

    def _release(self) -> None:
        self._bias, self._flat = {}, set()

    def _hooks(self, model: nn.Module, layers: list[nn.Module]) -> list[Any]:
        handles = [base_model(model).register_forward_pre_hook(self._before_model, with_kwargs=True)]
        for layer in layers:
            handles.append(layer.self_attn.register_forward_hook(self._after_attention, with_kwargs=True))
            handles.append(layer.self_attn.register_forward_pre_hook(self._before_attention, with_kwargs=True))
        return handles

    def _after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden_states = hidden_states_arg(args, kwargs)
        if not is_prefill(kwargs, hidden_states.shape[1]):
            return output  # not a prefill: leave the cache alone
        if getattr(module, "is_sliding", False):
            return output  # sliding-window layers (Gemma 3) already bound their cache
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        keys, values = layer.keys, layer.values
        length = keys.shape[2]
        kept = self.kept(length)
        if kept >= length:
            self._bias.pop(module.layer_idx, None)
            self._record(length, length)
            return output
        with torch.no_grad():
            scores = self.score(module, hidden_states, keys, values, kwargs)
            layer.keys, layer.values, sizes = self.merge(keys, values, scores, kept)
        heads = module.config.num_attention_heads
        hkv = layer.keys.shape[1]
        if sizes is None:  # kept entries stand for themselves: no bias
            log_sizes = torch.zeros(keys.shape[0], hkv, kept, device=keys.device)
            self._flat.add(module.layer_idx)
        else:
            log_sizes = sizes.log().float()
            self._flat.discard(module.layer_idx)
        # The mask is rebuilt for this layer's shorter cache even without proportional attention.
        self._bias[module.layer_idx] = log_sizes.repeat_interleave(heads // hkv, dim=1)[:, :, None, :]
        self._record(length, kept)
        return output

    def _before_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = self._bias.get(module.layer_idx)  # [B, H, 1, K]: log sizes of the merged entries
        cache = kwargs.get("past_key_values")
        if bias is None or cache is None:
            return None
        hidden_states = hidden_states_arg(args, kwargs)
        q_len = hidden_states.shape[1]
        if q_len == 1 and module.layer_idx in self._flat and kwargs.get("attention_mask") is None:
            return None  # no bias and one new token that sees the whole cache: keep SDPA's mask-free path
        past = cache.layers[module.layer_idx].keys.shape[2]
        kv_len = past + q_len
        bias = F.pad(bias, (0, kv_len - bias.shape[-1])).to(hidden_states.dtype)
        if q_len > 1:  # every cached entry is visible; the new tokens see each other causally
            bias = bias + cache_causal_mask(past, q_len, bias.device, bias.dtype)
        kwargs["attention_mask"] = bias
        return args, kwargs

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError(
                f"{type(self).__name__} supports batches of equal-length, unpadded sequences only; "
                "got an attention_mask with padding"
            )
        ids = kwargs.get("input_ids", args[0] if args else None)
        q_len = (ids if ids is not None else kwargs.get("inputs_embeds")).shape[1]
        if not self.original_length:
            return None  # the prefill itself
        start = self.original_length + self._decoded
        self._decoded += q_len
        if self.original_length == self.compressed_length:
            return None
        if kwargs.get("position_ids") is None:  # else the caller placed the tokens itself
            kwargs["position_ids"] = torch.arange(
                start, start + q_len, device=(ids if ids is not None else kwargs["inputs_embeds"]).device
            )[None]
        return args, kwargs
