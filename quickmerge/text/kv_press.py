"""``KVPress``: the base of every KV-cache press, owning the hooks and the cache bookkeeping.

A press subclass says only *what* to keep: :meth:`KVPress.score` rates each cached entry,
:meth:`KVPress.merge` turns the prompt's keys and values into the kept ones (default:
keep the top-scored entries, i.e. eviction), and optionally :meth:`KVPress.layer_budgets`
shares the kept entries out over the layers once every layer was scored. Everything else
lives here:

- prefill (a forward pass that fills an empty cache): a forward hook on each attention
  layer reads the layer's freshly filled ``DynamicLayer``, calls ``score`` and ``merge``
  and replaces it by a merged layer (:mod:`quickmerge.text.cache`) that keeps positions and
  masks right for every later call, inside the press or not. Sliding-window layers
  (Gemma 3's local layers, Mistral with ``sliding_window``) are left alone, as kvpress does.
  Every prefill starts afresh: several prompts in one ``with`` block each behave like a
  fresh press.
- merged entries: each remembers how many entries it stands for; while the press is
  active, a pre-hook gives the attention ``log(size)`` on those entries' logits
  (proportional attention) through its additive mask. Layers that read an earlier layer's
  keys and values (Gemma 3n's and Gemma 4's last ``num_kv_shared_layers``) own no cache:
  they attend with the mask their source layer got in the same call.
- decoding: each attention layer's call after the prefill reaches :meth:`KVPress.decoded`, and the end of the
  decoder stack's call :meth:`KVPress.after_decoding` (no-ops here; ``QuickMergePress(decoding_size=...)`` merges the
  cache again there, :mod:`quickmerge.text.decoding`).
- refusal: a prefill that should have compressed and did not (no cache reached the
  attention layers, every layer slides, an unknown transformers calling convention) raises;
  so do caches that cannot be shortened in place and attention implementations that would
  drop the proportional-attention bias; what no press could merge (a hybrid model's own
  cache class, values crossing KV heads, attention older than transformers' attention
  interface, sparse attention whose indexer picks the keys) is refused as the press is entered.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..primitives import top_indices
from . import flat
from .attention import attention_implementation, grouped_sdpa, is_sdpa
from .cache import (
    UnsupportedCacheError,
    cache_arg,
    check_cache,
    check_compressible,
    is_merged,
    merged_layer,
    own_cache_class,
    physical_length,
)
from .decoder import (
    UnsupportedAttentionError,
    attention_of,
    base_model,
    cache_causal_mask,
    check_attention_interface,
    check_dense,
    crosses_kv_heads,
    has_attention,
    hidden_states_arg,
    keeps_fixed_state,
    kv_sources,
    sliding_window_of,
    unsupported_message,
)
from .press import Press

PROPORTIONAL_BIAS = "log(group size) on merged entries' logits; proportional=False does without it"

# What the decoder stack's prefill call says about the prompt itself, kept for a deferring press that reads it
# again (:meth:`KVPress.rescore`): positions (a vision-language model's three-axis ones, shifted after an image), the
# image features Qwen3-VL adds to the hidden states of its first layers (DeepStack), and the per-token inputs of each
# layer that Gemma 3n's and Gemma 4's vision-language classes look up from the token ids and pass beside the
# embeddings (their decoder cannot find them from image embeddings). (Padded batches are refused.)
PROMPT_INPUTS = ("position_ids", "visual_pos_masks", "deepstack_visual_embeds", "per_layer_inputs")


def prompt_inputs(ids: Tensor | None, kwargs: dict) -> dict[str, Any]:
    """``input_ids`` (or ``inputs_embeds``) and the :data:`PROMPT_INPUTS` a prefill call was given."""
    inputs = {"input_ids": ids} if ids is not None else {"inputs_embeds": kwargs["inputs_embeds"]}
    inputs.update({name: kwargs[name] for name in PROMPT_INPUTS if kwargs.get(name) is not None})
    return inputs


def _check_mergeable(who: str, model: nn.Module, layers: list[nn.Module], attentions: list[nn.Module]) -> None:
    """Refuse, before any work, what a KV press cannot merge: a hybrid model whose fixed-size states this transformers
    keeps in a cache class of the model's own (no layers to shorten), attention pairing the values of one KV head
    with the keys of another, sparse attention whose indexer picks the keys (and caches its own), and attention
    modules older than transformers' attention interface."""
    hybrid = [i for i, layer in enumerate(layers) if keeps_fixed_state(layer)]
    own = own_cache_class(base_model(model)) if hybrid else None
    if own is not None:
        import transformers

        raise UnsupportedCacheError(
            f"{who} compresses the layers of a transformers Cache; transformers {transformers.__version__} keeps the "
            f"states of layers {hybrid} of {type(model).__name__} (a hybrid model) in a cache class of the model's "
            f"own ({own}), without layers: use a later transformers, where they are DynamicCache layers (5.5 or "
            "later; OLMo Hybrid: 5.15 or later)"
        )
    crossed = [attn for attn in attentions if crosses_kv_heads(attn)]
    if crossed:
        raise UnsupportedAttentionError(unsupported_message(crossed[0], (
            f"layers {[attn.layer_idx for attn in crossed]} pair the values of one KV head with the keys of another "
            "(differential attention: DiffLlama's two halves of the value heads), which a press that merges each KV "
            "head's entries its own way cannot keep aligned")))
    check_dense(attentions)
    check_attention_interface(attentions)


class Compressed(NamedTuple):
    """What :meth:`KVPress.merge` returns: ``[B, Hkv, kept, d]`` keys and values, and the
    number of prompt entries each kept entry stands for ``[B, Hkv, kept]`` (None: one each).

    Flat layout (:mod:`quickmerge.text.flat`): keys and values ``[B, 1, T, d]``, sizes ``[B, 1, T]``
    and ``owners [B, T]``, the KV head of each entry."""

    keys: Tensor
    values: Tensor
    sizes: Tensor | None
    owners: Tensor | None = None


@dataclass
class _Prefill:
    """What one prefill pass did, to tell afterwards whether it compressed what it should have."""

    length: int
    compressed: int = 0
    sliding: int = 0
    attention_calls: int = 0
    cache_seen: bool = False
    kwarg_names: tuple[str, ...] = ()
    pending: dict[int, tuple[Any, Any, Any, int]] = field(default_factory=dict)  # layers awaiting their budget
    inputs: dict[str, Any] = field(default_factory=dict)  # the decoder stack's prompt inputs (see PROMPT_INPUTS)


@dataclass
class KVPress(Press):
    """Compress each attention layer's KV cache during prefill (see the module docstring).

    Subclasses override :meth:`score` and/or :meth:`merge` and add their own options as
    dataclass fields.
    """

    _prefill: _Prefill | None = field(default=None, init=False, repr=False)
    _full_layers: list[int] = field(default_factory=list, init=False, repr=False)
    _kv_sources: dict[int, int] = field(default_factory=dict, init=False, repr=False)  # shared layer -> its source
    _masks: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)  # this call's, of each source

    # ---- what a press says --------------------------------------------------------------
    def score(
        self, module: nn.Module, hidden_states: Tensor, keys: Tensor, values: Tensor, kwargs: dict
    ) -> Tensor | None:
        """Score ``[B, Hkv, L]`` of each cached entry (higher = more worth keeping), or None."""
        return None

    def merge(self, module: nn.Module, keys: Tensor, values: Tensor, scores: Tensor | None, kept: int) -> Compressed:
        """``[B, Hkv, L, d]`` keys and values of ``module``'s layer -> ``kept`` entries per head.
        Default: keep the top-scored entries in their order (eviction)."""
        if scores is None:
            raise NotImplementedError(f"{type(self).__name__} must override score() or merge()")
        index = top_indices(scores, kept).sort(dim=-1).values[..., None]
        keys = keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1]))
        values = values.gather(2, index.expand(-1, -1, -1, values.shape[-1]))
        return Compressed(keys, values, None)

    def check_attentions(self, attentions: list[nn.Module]) -> None:
        """Raise, as the press is entered, for attention layers this press's options cannot work on (default:
        none)."""

    def adds_bias(self) -> bool:
        """Whether merged entries get ``log(size)`` on their logits (needs an additive float mask)."""
        return False

    def folds_heads(self) -> bool:
        """Whether this press leaves caches in the flat layout (:mod:`quickmerge.text.flat`), which only
        attention through the press reads (its masks tell the heads apart)."""
        return False

    def defers(self) -> bool:
        """Whether this press shares its budget over the layers once every layer was scored
        (:meth:`layer_budgets`); the default compresses each layer as soon as it is scored.

        A deferring press keeps the whole cache until the end of the prefill (as an uncompressed
        prefill does) and must keep ``sum(kept(L))`` entries in all, so it is compared with
        others at equal memory.
        """
        return False

    def layer_budgets(self, lengths: dict[int, int]) -> dict[int, int]:
        """Entries each layer keeps, ``{layer: kept}``, given each layer's prompt length."""
        return {i: self.kept(length) for i, length in lengths.items()}

    def rescore(
        self, base: nn.Module, cache: Any, attentions: dict[int, nn.Module], scores: dict[int, Tensor | None],
        prompt: dict[str, Tensor],
    ) -> dict[int, Tensor | None]:
        """A deferring press's last word on the scores, once the whole prompt was prefilled (default: as
        :meth:`score` gave them). ``base`` is the decoder stack, ``prompt`` its input (:func:`prompt_inputs`);
        the cache still holds every layer whole."""
        return scores

    def decoded(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """An attention layer ran a call after the prefill (decoding), its cache updated (default: nothing)."""

    def after_decoding(self) -> None:
        """The decoder stack finished a call after the prefill (default: nothing); every layer ran, so a cache
        changed here is seen whole by the next call, layers that read another layer's cache included."""

    # ---- hooks ---------------------------------------------------------------------------
    def _release(self) -> None:
        self._prefill, self._masks = None, {}

    def _hooks(self, model: nn.Module, layers: list[nn.Module]) -> list[Any]:
        self._kv_sources = kv_sources(model, layers)
        shared = [attention_of(layers[i]) for i in self._kv_sources]
        attentions = [attention_of(layer) for layer in layers if has_attention(layer)]  # not a hybrid's other layers
        _check_mergeable(type(self).__name__, model, layers, attentions)
        self.check_attentions(attentions)
        self._full_layers = [attn.layer_idx for attn in attentions if sliding_window_of(attn) is None]
        base = base_model(model)
        handles = [
            base.register_forward_pre_hook(self._before_model, with_kwargs=True),
            base.register_forward_hook(self._after_model, with_kwargs=True),
        ]
        for attn in attentions:
            handles.append(attn.register_forward_hook(self._after_attention, with_kwargs=True))
            handles.append(attn.register_forward_pre_hook(self._before_attention, with_kwargs=True))
        for attention in shared:
            handles.append(attention.register_forward_pre_hook(self._before_shared_attention, with_kwargs=True))
        return handles

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        q_len = (ids if ids is not None else kwargs.get("inputs_embeds")).shape[1]
        cache = cache_arg(kwargs)
        self._masks = {}
        new_prompt = cache is None or cache.get_seq_length() == 0
        self._prefill = _Prefill(q_len) if new_prompt else None
        if new_prompt:
            self._prefill.inputs = prompt_inputs(ids, kwargs)
            refusal = self.refusal(module)  # the attention implementation may change between calls
            if refusal is not None:
                raise ValueError(refusal)
            if cache is not None:
                check_cache(cache, type(self).__name__)
            for index in self._full_layers:  # caches made with all their layers are checked before any work
                if cache is not None and index < len(cache.layers):
                    check_compressible(cache, cache.layers[index], type(self).__name__)
            self._new_prompt()

    def _attention(self, model: nn.Module) -> contextlib.AbstractContextManager:
        # proportional attention is a float mask: keep SDPA's grouped-query path (see attention.py)
        return grouped_sdpa(model) if self.adds_bias() else contextlib.nullcontext()

    def refusal(self, model: nn.Module) -> str | None:
        implementation = attention_implementation(model)
        if not self.adds_bias() or implementation == "eager" or is_sdpa(implementation):
            return None
        return (f"{type(self).__name__} passes attention an additive float mask ({self.bias_reason()}), which "
                f"attention implementation {implementation!r} does not take; use "
                "model.set_attn_implementation('sdpa') (or 'eager')")

    def bias_reason(self) -> str:
        """What the additive mask of :meth:`adds_bias` carries, and how to do without it if one can."""
        return PROPORTIONAL_BIAS

    def _after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call = self._prefill
        if call is None:  # decoding: the prompt is compressed already
            self.decoded(module, args, kwargs)
            return output
        call.attention_calls += 1
        call.kwarg_names = tuple(kwargs)
        cache = cache_arg(kwargs)
        if cache is None:
            return output
        call.cache_seen = True
        check_cache(cache, type(self).__name__)
        layer = cache.layers[module.layer_idx]
        if sliding_window_of(module) is not None:
            call.sliding += 1
            # Sliding layers bound their own cache and are left alone. A cache made without the model's
            # config does not know they slide; say so, or transformers would size the full-attention
            # layers' masks from this (longer) layer.
            layer.is_sliding = True
            return output
        check_compressible(cache, layer, type(self).__name__)
        hidden_states = hidden_states_arg(args, kwargs)
        length = physical_length(layer)
        if length != hidden_states.shape[1] or is_merged(layer):
            return output  # the cache held entries before this call: not a prefill of this layer
        kept = self.kept(length)
        if kept >= length:
            self._record(length, length)
            return output
        with torch.no_grad():
            scores = self.score(module, hidden_states, layer.keys, layer.values, kwargs)
        if self.defers():
            call.pending[module.layer_idx] = (module, cache, scores, length)
        else:
            self._compress(module, cache, scores, length, kept)
        call.compressed += 1
        return output

    def _compress(self, module: nn.Module, cache: Any, scores: Tensor | None, length: int, kept: int) -> None:
        layer = cache.layers[module.layer_idx]
        with torch.no_grad():
            keys, values, sizes, owners = self.merge(module, layer.keys, layer.values, scores, kept)
        merged = merged_layer(layer, keys, values, length)
        heads = module.config.num_attention_heads
        if owners is not None:  # flat layout: each query head sees its own KV head's entries only
            hkv = module.config.num_key_value_heads
            merged.log_sizes = flat.owner_bias(sizes[:, 0].log(), owners, heads, hkv)
            merged.folded_heads, merged.prompt_length, merged.prompt_entries = hkv, length, keys.shape[-2]
        elif sizes is not None:
            merged.log_sizes = sizes.log().float().repeat_interleave(heads // keys.shape[1], dim=1)[:, :, None, :]
        cache.layers[module.layer_idx] = merged
        self._record(length, kept)

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._prefill = self._prefill, None
        if call is None:
            self.after_decoding()
            return
        if call.pending:
            final = self.rescore(
                module, next(iter(call.pending.values()))[1], {i: entry[0] for i, entry in call.pending.items()},
                {i: entry[2] for i, entry in call.pending.items()}, call.inputs,
            )
            call.pending = {i: (attn, cache, final[i], length) for i, (attn, cache, _, length) in call.pending.items()}
            budgets = self.layer_budgets({i: entry[3] for i, entry in call.pending.items()})
            for index, (attn, cache, scores, length) in call.pending.items():
                self._compress(attn, cache, scores, length, budgets[index])
            call.pending.clear()
        if call.compressed or self.kept(call.length) >= call.length:
            return
        import transformers

        who = type(self).__name__
        if call.sliding and call.sliding == call.attention_calls:
            raise RuntimeError(
                f"{who} compressed nothing: every attention layer of this model uses sliding-window attention "
                f"(sliding_window={module.config.sliding_window}), whose cache is bounded already, and {who} "
                "compresses full-attention layers only. If your prompts and generations stay under the window, "
                "load the model with config.sliding_window=None."
            )
        if not call.cache_seen:
            raise RuntimeError(
                f"{who} compressed nothing: no KV cache reached the attention layers in this forward pass "
                f"(they received the arguments {list(call.kwarg_names)} under transformers "
                f"{transformers.__version__}). Call the model with use_cache=True or cache=DynamicCache() "
                "(past_key_values= before transformers 5.24)."
            )
        raise RuntimeError(
            f"{who} compressed nothing in a prefill of {call.length} tokens (transformers {transformers.__version__})"
        )

    def _before_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = cache_arg(kwargs)
        if cache is None or module.layer_idx >= len(getattr(cache, "layers", ())):
            return None
        layer = cache.layers[module.layer_idx]
        bias = getattr(layer, "log_sizes", None)  # [B, H, 1, K]: log sizes of the merged entries
        if bias is None:
            return None  # nothing merged here: the model's own masks are right (see cache.py)
        hidden_states = hidden_states_arg(args, kwargs)
        q_len = hidden_states.shape[1]
        past = physical_length(layer)
        if layer.folded_heads:
            new = flat.new_entries_bias(q_len, bias.shape[1], layer.folded_heads, bias.device)
            bias = torch.cat([bias.expand(-1, -1, q_len, -1), new.expand(bias.shape[0], -1, -1, -1)], dim=-1)
            layer._press_call = True
            bias = bias.to(hidden_states.dtype)
        else:
            bias = F.pad(bias, (0, past + q_len - bias.shape[-1])).to(hidden_states.dtype)
            if q_len > 1:  # every cached entry is visible; the new tokens see each other causally
                bias = bias + cache_causal_mask(past, q_len, bias.device, bias.dtype)
        kwargs["attention_mask"] = bias
        if module.layer_idx in self._kv_sources.values():
            self._masks[module.layer_idx] = bias  # the later layers reading these keys attend with it too
        return args, kwargs

    def _before_shared_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """A layer reading an earlier layer's keys and values (:func:`~quickmerge.text.decoder.shares_kv`) gets
        that layer's mask of this call: the same entries, the same bias (none in a prefill, where it reads the
        whole prompt's keys as computed before the press merged them, under the model's own mask)."""
        mask = self._masks.get(self._kv_sources[module.layer_idx])
        if mask is None:
            return None
        # Gemma 4 may hand these layers only the last tokens of a call (logits_to_keep): its last queries' rows
        kwargs["attention_mask"] = mask[..., -hidden_states_arg(args, kwargs).shape[1]:, :]
        return args, kwargs
