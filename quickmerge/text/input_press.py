"""``QuickMergeInputPress``: fewer prompt tokens after decoder layer l, so prefill itself is faster.

``with QuickMergeInputPress(compression_ratio=0.5, layer=2)(model): model.model(ids, past_key_values=cache)``
runs layers 0..l on all N prompt tokens, then merges the hidden states into K = N - int(N * ratio)
contiguous, ordered spans (the core's causal mode), so layers l+1.. run on K tokens. A merged
token sits at the position of its span's last token; later tokens keep their true positions.

The upper layers' attention masks are built from those positions (causal, and within the
layer's window for sliding-window layers: Gemma 3's local layers, Mistral's
``sliding_window``), at prefill and for every token decoded inside the ``with`` block; a layer
reading an earlier layer's keys and values (Gemma 3n, Gemma 4's ``num_kv_shared_layers``)
attends with that layer's mask of the same call (the merge layer must sit below those layers). Their
cache layers remember the positions of their entries; decoding several tokens at once
outside the press, which would need those masks, raises. Batches must be unpadded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_choice, check_positive_int, check_real
from ..call_arguments import layer_argument, with_layer_argument
from ..merging import contiguous_spans, merge_mass, spans_along_time
from ..primitives import top_indices, weighted_mean
from .cache import DYNAMIC_OR_SLIDING, cache_arg, check_compressible, merged_layer, physical_length
from .decoder import (
    POSITION_KWARGS,
    UnsupportedAttentionError,
    attention_of,
    base_model,
    check_attention_interface,
    check_dense,
    decoder_layers,
    has_attention,
    hidden_states_arg,
    is_chunked,
    keeps_fixed_state,
    key_rotation,
    kv_sources,
    plain_rotary,
    prerope_keys,
    probed_rotation,
    query_position_scale,
    rotate,
    sliding_window_of,
    unsupported_message,
)
from .latent import attended_keys
from .press import Press
from .scoring import SALIENT, Salient, window_saliency


def gathered_mask(mask: Tensor, positions: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[B, 1, K, K]`` of merged tokens at ``positions [B, K]`` from the model's own prompt
    mask ``[1 or B, 1, N, N]`` (bool: True = attends; or additive: 0 = attends): each merged token
    attends where its position's token did (a vision-language model's image tokens attend to their
    whole image, Gemma 3's)."""
    b, k = positions.shape
    n = mask.shape[-2]
    rows = mask[:, 0, :, :n].expand(b, -1, -1).gather(1, positions[:, :, None].expand(-1, -1, n))  # [B, K, N]
    sub = rows.gather(2, positions[:, None, :].expand(-1, k, -1))  # [B, K, K]
    allowed = sub if sub.dtype == torch.bool else sub == 0
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, float("-inf"))[:, None]


def gather_tokens(table: Tensor, positions: Tensor) -> Tensor:
    """Rows of a rotary table ``[1 or B, N, d]`` (or multimodal RoPE's ``[3, 1 or B, N, d]``; real, or one complex
    number per pair of channels) at ``positions [B, K]``:
    ``[B, K, d]`` (``[3, B, K, d]``)."""
    table = table.expand(*table.shape[:-3], positions.shape[0], -1, -1)
    index = positions[..., None].expand(*table.shape[:-3], -1, -1, table.shape[-1])
    return table.gather(-2, index)


def gathered_positions(attention: nn.Module, kwargs: dict, positions: Tensor) -> dict:
    """The call's ``position_ids`` (``[1 or B, N]``, multimodal RoPE's ``[3, 1 or B, N]``) and ``cache_position``
    (``[N]``) at the merged prompt's ``positions [B, K]``, for a layer that reads them (Ministral 3 scales its
    queries by position). ``cache_position`` has one row for the whole batch: where the prompts merged to different
    positions it is left whole, unless the layer scales its queries by it, which takes the first prompt's positions
    where every prompt's queries scale alike there and is refused otherwise."""
    out = {}
    ids = kwargs.get("position_ids")
    if ids is not None:
        ids = ids.expand(*ids.shape[:-2], positions.shape[0], -1)
        out["position_ids"] = ids.gather(-1, positions.expand(*ids.shape[:-2], -1, -1))
    cache_position = kwargs.get("cache_position")
    if cache_position is None:
        return out
    gathered = cache_position[positions]  # [B, K]
    if bool((gathered == gathered[:1]).all()):
        out["cache_position"] = gathered[0]
        return out
    scale = query_position_scale(attention, {"cache_position": gathered}, gathered.shape[1])  # [B, 1, K, 1]
    if scale is None:
        return out
    if not torch.equal(scale, scale[:1].expand_as(scale)):
        why = ("it scales its queries by cache_position, which this transformers passes once for the whole batch, "
               "and the batch's prompts merged to positions it scales differently; merge them one at a time "
               "(or use transformers 5.4 or later, which scales by position_ids, one row per prompt)")
        raise UnsupportedAttentionError(unsupported_message(attention, why))
    out["cache_position"] = gathered[0]
    return out


def position_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[B, 1, q, kv]``: query at position p sees keys at positions ``<= p``
    (and ``> p - window`` for a sliding window). ``q_pos [B, q]``, ``k_pos [B, kv]``."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= diff < window
    return torch.zeros(allowed.shape, dtype=dtype, device=q_pos.device).masked_fill(~allowed, float("-inf"))[:, None]


@dataclass
class QuickMergeInputPress(Press):
    """Merge the prompt's hidden states after decoder layer ``layer`` (order-preserving).

    Args:
        compression_ratio: share of prompt tokens removed, in [0, 1).
        layer: index of the decoder layer after which tokens are merged; -1 merges the token
            embeddings before the first layer (no attention to score them yet: spans follow
            similarity alone, so identical tokens merge first, as video-token pruning does).
        window, epsilon, saliency_weight, salient: as in :class:`~quickmerge.QuickMergePress`;
            saliency is the attention layer ``layer`` pays from its last ``window`` queries,
            averaged over heads.
        time_period: video: tokens per frame; spans then run along time over one location in
            consecutive frames (a static background becomes one token, as video-token pruning
            before a language model does); a merged token still sits at its last member's
            position, and the merged prompt stays ordered by position.
        time_offset: tokens before the first frame (a BOS), kept out of the frame grid.
        token_ids: merge only prompt tokens with these ids (a vision-language model's image or
            video token, e.g. ``(model.config.image_token_id,)``), as visual-token pruning does;
            every other token stays whole and spans never cross it. ``compression_ratio`` is then
            the share of those tokens removed (each run of them keeps at least one token);
            ``achieved_ratio`` reports the share of the whole prompt. Needs ``input_ids`` (the
            model's, the outer model's for a vision-language model), the same number of those
            tokens in every row, and ``time_period=None``.
    """

    layer: int = 4
    window: int = 16
    epsilon: float = 0.03
    saliency_weight: float = 1.0
    salient: Salient = "low_entropy"
    time_period: int | None = None
    time_offset: int = 0
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token_ids is not None:
            ids = tuple(self.token_ids) if isinstance(self.token_ids, (tuple, list)) else None
            if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
                raise ValueError(f"token_ids must be a non-empty tuple of token ids (ints >= 0), "
                                 f"got {self.token_ids!r}")
            if self.time_period is not None:
                raise ValueError("token_ids and time_period cannot be combined: spans along time assume every "
                                 "prompt token after time_offset belongs to a frame")
            self.token_ids = ids
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < -1:
            raise ValueError(f"layer must be an int >= -1 (-1: merge the embeddings), got {self.layer!r}")
        check_positive_int(self.window, "window")
        check_real(self.epsilon, "epsilon", low=0.0, high=1.0, low_open=True, high_open=False)
        check_real(self.saliency_weight, "saliency_weight", low=0.0, high=math.inf, low_open=False, high_open=True)
        check_choice(self.salient, "salient", SALIENT)
        if self.time_period is not None:
            check_positive_int(self.time_period, "time_period")
        check_positive_int(self.time_offset, "time_offset", minimum=0)
        self._prompt_length: int | None = None  # set while a prefill pass runs
        self._positions: Tensor | None = None  # [B, K] positions of the merged prompt, during that pass
        self._groups: tuple[Tensor, Tensor, int] | None = None  # its merge: mass, assignment [B, N] and K
        # a vision-language model's own prompt masks, by layer type, during that pass (None: causal)
        self._prompt_masks: dict[str, Tensor | None] | None = None
        self._call_ids: Tensor | None = None  # [B, N] input ids of the outer model's last call (token_ids)
        self._selected: Tensor | None = None  # [B, N] bool: the prompt tokens token_ids lets merge
        self._attention_input: tuple[Tensor, dict] | None = None  # the merge layer's, during its forward
        self._kv_sources: dict[int, int] = {}  # layers reading an earlier layer's keys and values -> that layer
        self._masks: dict[int, Tensor] = {}  # the masks those earlier layers got in this call

    def _new_prompt(self) -> None:
        super()._new_prompt()
        self._prompt_length, self._positions, self._prompt_masks, self._selected = None, None, None, None
        self._groups = None

    def _release(self) -> None:
        self._prompt_length, self._positions, self._prompt_masks, self._selected = None, None, None, None
        self._groups = None
        self._call_ids = None
        self._masks = {}

    def refusal(self, model: nn.Module) -> str | None:
        layers = decoder_layers(model)
        if getattr(base_model(model), "layers", None) is None:  # GPT-2's stack (``h``): its output viewed as the input
            return (f"QuickMergeInputPress hands the upper layers a shorter prompt, but {type(model).__name__}'s "
                    "decoder stack reshapes its output to the prompt's length (GPT-2's layout): use QuickMergePress, "
                    "which merges its cache")
        sources = kv_sources(model, layers)
        if sources and self.layer >= min(sources.values()):
            return (f"layer must be below {min(sources.values())} on {type(model).__name__}: layers "
                    f"{min(sources)}-{max(sources)} attend with the keys and values of layers "
                    f"{sorted(set(sources.values()))}, which must hold the merged prompt; got {self.layer}")
        other = [i for i, layer in enumerate(layers)
                 if i not in sources and (keeps_fixed_state(layer) or not has_attention(layer))]
        if other:
            return (f"QuickMergeInputPress hands the merged prompt to the upper layers with masks of its positions; "
                    f"layers {other} of {type(model).__name__} (a hybrid model) run a linear attention, a state-space "
                    "block or a convolution, which take none: use QuickMergePress, which merges the cache of its "
                    "attention layers")
        chunked = [i for i, layer in enumerate(layers) if is_chunked(attention_of(layer))]
        if chunked:
            return (f"QuickMergeInputPress hands the merged prompt to the upper layers with masks of its positions; "
                    f"layers {chunked} of {type(model).__name__} attend within chunks (Llama 4's chunked attention), "
                    "which it does not build: use QuickMergePress")
        last = len(layers) - 1
        if self.layer >= last:
            return (f"layer must be below the last decoder layer ({last}) of {type(model).__name__}, got "
                    f"{self.layer}")
        deepstack = getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes", None) or ()
        if deepstack and self.layer < len(deepstack):
            return (f"layer must be {len(deepstack)} or more on {type(model).__name__}: it adds image features to "
                    f"the hidden states after layers 0..{len(deepstack) - 1} (DeepStack), which must keep every "
                    f"token; got {self.layer}")
        return None

    def _hooks(self, model: nn.Module, layers: list[nn.Module]) -> list[Any]:
        attentions = [attention_of(layer) for layer in layers if has_attention(layer)]
        check_dense(attentions)  # what neither press can follow first, then what this one cannot
        check_attention_interface(attentions)
        refusal = self.refusal(model)
        if refusal is not None:
            raise ValueError(refusal)
        base = base_model(model)
        self._kv_sources = kv_sources(model, layers)
        handles = [
            model.register_forward_pre_hook(self._capture_ids, with_kwargs=True),
            base.register_forward_pre_hook(self._before_model, with_kwargs=True),
            base.register_forward_hook(self._after_model, with_kwargs=True),
        ]
        if self.layer == -1:  # merge the embeddings as they enter the first layer
            handles.append(layers[0].register_forward_pre_hook(self._merge_before_first, with_kwargs=True))
            handles.append(layers[0].register_forward_hook(self._after_upper, with_kwargs=True))
        else:
            handles.append(attention_of(layers[self.layer]).register_forward_pre_hook(self._capture_attention_input,
                                                                                 with_kwargs=True))
            handles.append(layers[self.layer].register_forward_hook(self._merge_after, with_kwargs=True))
        for block in layers[self.layer + 1 :] if self.layer >= 0 else layers[1:]:
            handles.append(block.register_forward_pre_hook(self._before_upper, with_kwargs=True))
            handles.append(block.register_forward_hook(self._after_upper, with_kwargs=True))
        return handles

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        implementation = getattr(module.config, "_attn_implementation", None)
        if implementation not in ("eager", "sdpa"):
            raise ValueError(
                "QuickMergeInputPress gives its upper layers masks of their own (merged positions) as additive "
                f"float masks, which attention implementation {implementation!r} does not take; use "
                "model.set_attn_implementation('sdpa') (or 'eager')"
            )
        ids = kwargs.get("input_ids", args[0] if args else None)
        q_len = (ids if ids is not None else kwargs.get("inputs_embeds")).shape[1]
        cache = cache_arg(kwargs)
        self._masks = {}
        new_prompt = cache is None or cache.get_seq_length() == 0
        if new_prompt:
            self._new_prompt()
            self._prompt_length = q_len
            mask = kwargs.get("attention_mask")
            if isinstance(mask, dict):  # prepared by a vision-language model around its decoder
                self._prompt_masks = mask
            if self.token_ids is not None:
                self._selected = self._selection(ids, q_len)
        if self._kv_sources and kwargs.get("logits_to_keep"):
            # Gemma 4 runs its layers reading other layers' caches on the last logits_to_keep tokens only, cut from
            # tables of the unmerged prompt; the causal LM around the decoder keeps only those logits all the same
            kwargs["logits_to_keep"] = 0
            return args, kwargs
        return None

    def _capture_attention_input(self, attn: nn.Module, args: tuple, kwargs: dict) -> None:
        """The merge layer's attention input (after the layer's own norm, wherever it sits) and its positions:
        ``position_embeddings`` (cos, sin), and ``position_ids`` / ``cache_position`` where given."""
        positions = {k: kwargs[k] for k in POSITION_KWARGS if k in kwargs}
        self._attention_input = (hidden_states_arg(args, kwargs), positions)

    def _merge_after(self, block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        raw = output[0] if isinstance(output, tuple) else output
        hidden = as_tokens(raw)
        n = hidden.shape[1]
        normed, attn_kwargs = self._attention_input
        position_embeddings = attn_kwargs.get("position_embeddings")  # None: no rotation (OPT's learned positions)
        self._attention_input = None
        if self._prompt_length != n:
            return None  # decoding, or a pass that is not a fresh prompt
        kept = self._kept_tokens(n)
        self._record(n, kept)
        if kept >= n:
            self._prompt_length = None
            return None
        attn = attention_of(block)
        cache = cache_arg(kwargs)
        with torch.no_grad():
            # the layer's keys: as cached by the attention, or recomputed (no cache, or a sliding layer's
            # cache that kept only its window)
            cached = cache.layers[attn.layer_idx] if cache is not None else None
            read = None if cached is None else attended_keys(attn, cached.keys, cached.values)
            keys = read if physical_length(cached) == n else _layer_keys(attn, normed, position_embeddings, read)
            saliency = window_saliency(attn, normed, keys, attn_kwargs, window=self.window, salient=self.salient)
            saliency = saliency.mean(dim=1)  # [B, N]
            assignment, last = self._group(hidden, saliency, kept)
            top = top_indices(saliency, kept)
            mask = torch.zeros_like(saliency).scatter_(1, top, 1.0)
            mass = merge_mass(mask, saliency, self.epsilon)
        merged = like_hidden(weighted_mean(hidden, mass, assignment, kept)[0], raw)
        self._positions, self._groups = last, (mass, assignment, kept)
        return (merged, *output[1:]) if isinstance(output, tuple) else merged

    def _merge_before_first(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        raw = hidden_states_arg(args, kwargs)
        hidden = as_tokens(raw)
        b, n, _ = hidden.shape
        if self._prompt_length == n:
            kept = self._kept_tokens(n)
            self._record(n, kept)
            if kept < n:
                saliency = hidden.new_ones(b, n, dtype=torch.float32)  # nothing scores them yet: all alike
                with torch.no_grad():
                    assignment, last = self._group(hidden, saliency, kept)
                mass = torch.ones_like(saliency)
                merged = like_hidden(weighted_mean(hidden, mass, assignment, kept)[0], raw)
                self._positions, self._groups = last, (mass, assignment, kept)
                if "hidden_states" in kwargs:
                    kwargs["hidden_states"] = merged
                else:
                    args = (merged, *args[1:])
            else:
                self._prompt_length = None
        changed = self._before_upper(block, args, kwargs)
        return changed if changed is not None else (args, kwargs)

    def _group(self, hidden: Tensor, saliency: Tensor, kept: int) -> tuple[Tensor, Tensor]:
        """Group ``[B, N]`` of each prompt token (ordered by position) and each group's last position ``[B, K]``."""
        b, n, _ = hidden.shape
        assignment = self._spans(hidden, saliency, kept)
        pos = torch.arange(n, device=hidden.device).expand(b, n)
        last = torch.zeros(b, kept, dtype=torch.long, device=hidden.device).scatter_reduce(1, assignment, pos, "amax")
        if self.time_period is not None:  # groups in order of their positions, as the contiguous spans are
            last, rank = last.sort(dim=-1)
            order = torch.empty_like(rank).scatter_(1, rank, torch.arange(kept, device=rank.device).expand_as(rank))
            assignment = order.gather(1, assignment)
        return assignment, last

    def _capture_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._call_ids = ids if isinstance(ids, Tensor) else None

    def _selection(self, decoder_ids: Tensor | None, n: int) -> Tensor:
        """``[B, N]`` bool: prompt tokens whose id is in ``token_ids``; raises before any layer runs if
        there are no ids to read or the rows hold different numbers of them."""
        ids = decoder_ids if decoder_ids is not None else self._call_ids
        if ids is None or ids.dim() != 2 or ids.shape[1] != n:
            raise ValueError(
                "QuickMergeInputPress(token_ids=...) reads the prompt's input_ids; this call passed "
                + ("none (only inputs_embeds)" if ids is None else f"input_ids of shape {tuple(ids.shape)} for "
                   f"{n} prompt tokens")
            )
        selected = torch.isin(ids, torch.tensor(self.token_ids, device=ids.device))
        counts = selected.sum(dim=1)
        if bool((counts != counts[0]).any()):
            raise ValueError(
                f"QuickMergeInputPress(token_ids={self.token_ids}) needs the same number of those tokens in every "
                f"row of the batch; got {counts.tolist()}"
            )
        return selected

    def _kept_tokens(self, n: int) -> int:
        """Tokens the merged prompt keeps: ``kept(n)``, or with ``token_ids`` every other token plus
        ``kept(selected)``, and at least one per run of selected tokens."""
        if self._selected is None:
            return self.kept(n)
        sel = self._selected
        chosen = int(sel[0].sum())
        if chosen == 0:
            return n
        runs = int((sel & ~F.pad(sel[:, :-1], (1, 0))).sum(dim=1).max())  # starts of runs, most in a row
        return n - chosen + max(self.kept(chosen), runs)

    def _spans(self, hidden: Tensor, saliency: Tensor, kept: int) -> Tensor:
        """Group ``[B, N]`` of each prompt token: contiguous spans, or spans along time (``time_period``)."""
        if self._selected is not None:  # links that touch a token outside token_ids are cut first
            sel = self._selected
            return contiguous_spans(hidden, saliency, kept, self.saliency_weight, cut_first=~(sel[:, :-1] & sel[:, 1:]))
        if self.time_period is None:
            return contiguous_spans(hidden, saliency, kept, self.saliency_weight)
        return spans_along_time(hidden, saliency, kept, self.time_period, self.time_offset, self.saliency_weight)

    def _before_upper(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        hidden = hidden_states_arg(args, kwargs)
        attn = attention_of(block)
        window = sliding_window_of(attn)
        cache = cache_arg(kwargs)
        index = attn.layer_idx
        source = self._kv_sources.get(index)  # a layer reading an earlier layer's keys and values: no cache of its own
        owns = source is None and cache is not None and index < len(cache.layers)
        layer = cache.layers[index] if owns else None  # None: lazily made
        if self._positions is not None:  # the prefill: the merged prompt itself
            positions = self._positions
            if layer is not None:
                check_compressible(cache, layer, "QuickMergeInputPress", DYNAMIC_OR_SLIDING)
            tables = layer_argument(block, args, kwargs, "position_embeddings")
            if isinstance(tables, Tensor):  # complex (DeepSeek V2)
                args = with_layer_argument(block, args, kwargs, "position_embeddings", gather_tokens(tables, positions))
            elif tables is not None:  # None: a model without rotary tables (OPT's positions are in the embeddings)
                args = with_layer_argument(block, args, kwargs, "position_embeddings",
                                           tuple(gather_tokens(t, positions) for t in tables))
            kwargs.update(gathered_positions(attn, kwargs, positions))
            args = self._merged_per_layer_input(block, args, kwargs)
            mask = self._masks.get(source)  # a layer reading its source's keys and values: the source's mask
            if mask is None:
                own = self._own_mask(block)
                mask = (position_mask(positions, positions, window, hidden.dtype) if own is None
                        else gathered_mask(own, positions, hidden.dtype))
        elif getattr(layer, "needs_press", False):  # decoding on a cache this press merged
            # new tokens follow the prompt in its order; the layers' position ids cannot say it for every model
            # (multimodal RoPE: none are passed, the three-axis positions sit in the rotary table)
            new = layer.positions[:, -1:] + torch.arange(1, hidden.shape[-2] + 1, device=layer.positions.device)
            keys = torch.cat([layer.positions, new], dim=1)
            mask = position_mask(new, keys, window, hidden.dtype)
            layer._press_call, layer._new_positions = True, new
        elif source in self._masks:  # decoding a layer that reads its source's keys and values of this call
            mask = self._masks[source]
        else:
            return None
        if index in self._kv_sources.values():
            self._masks[index] = mask  # the later layers reading this one's keys and values attend with it too
        kwargs["attention_mask"] = mask
        return args, kwargs

    def _merged_per_layer_input(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """The layer's own input per prompt token, Gemma 3n's and Gemma 4's ``per_layer_input [B, N, d]``, merged with
        the weights that merged the hidden states; ``args`` with it in place (kwargs: in place). Layers without one:
        unchanged."""
        value = layer_argument(block, args, kwargs, "per_layer_input")
        if not isinstance(value, Tensor):
            return args
        mass, assignment, kept = self._groups
        merged = weighted_mean(value, mass, assignment, kept)[0]
        return with_layer_argument(block, args, kwargs, "per_layer_input", merged)

    def _after_upper(self, block: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = cache_arg(kwargs)
        index = attention_of(block).layer_idx
        if cache is None or index in self._kv_sources:
            return  # no cache, or a layer that keeps none of its own
        layer = cache.layers[index]
        if self._positions is not None:  # the prefill: remember where the entries sit
            # the layer stands for the whole prompt: its logical length is the prompt's (positions continue)
            merged = merged_layer(layer, layer.keys, layer.values, self._prompt_length or physical_length(layer))
            merged.positions = self._positions[:, -physical_length(layer) :]
            merged.needs_press, merged.window = True, sliding_window_of(attention_of(block))
            cache.layers[index] = merged
        elif getattr(layer, "needs_press", False):
            layer.positions = torch.cat([layer.positions, layer._new_positions], dim=1)[:, -physical_length(layer) :]

    def _own_mask(self, block: nn.Module) -> Tensor | None:
        """The model's own prompt mask for ``block``'s attention, where a vision-language model prepared one
        that is not plain causal (image tokens that see their whole image); None: build it from positions."""
        if not self._prompt_masks:
            return None
        attn = attention_of(block)
        types = getattr(attn.config, "layer_types", None)
        kind = types[attn.layer_idx] if types else "full_attention"
        return self._prompt_masks.get(kind)

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        unmerged = self._prompt_length is not None and self._positions is None
        length = self._prompt_length
        self._positions, self._prompt_length, self._prompt_masks, self._groups = None, None, None, None
        self._call_ids = None  # read by this call only: a later call of the decoder alone brings its own
        if unmerged and self._kept_tokens(length) < length:
            raise RuntimeError(
                f"QuickMergeInputPress merged nothing in a prefill of {length} tokens: the hidden states around layer "
                f"{self.layer} of {type(module).__name__} did not hold them as [batch, tokens, features] (nor as "
                "Gemma 3n's [streams, batch, tokens, features])"
            )


def as_tokens(hidden: Tensor) -> Tensor:
    """``[B, N, D]`` hidden states as the merge reads them; Gemma 3n's AltUp streams ``[A, B, N, D]`` side by side in
    the features, ``[B, N, A * D]``."""
    return hidden if hidden.dim() == 3 else hidden.permute(1, 2, 0, 3).flatten(2)


def like_hidden(tokens: Tensor, hidden: Tensor) -> Tensor:
    """``[B, K, D']`` merged tokens back in the layout of ``hidden`` (:func:`as_tokens`'s inverse)."""
    if hidden.dim() == 3:
        return tokens
    a, b, _, d = hidden.shape
    return tokens.view(b, -1, a, d).permute(2, 0, 1, 3)


def _layer_keys(attn: nn.Module, normed: Tensor, position_embeddings: tuple | None, cached: Tensor | None) -> Tensor:
    """Post-RoPE keys ``[B, Hkv, N, d]`` of a layer whose cache does not hold them all: rotated as the
    layer's ``cached`` keys (a sliding window's last entries) show, or, without a cache, as the layer
    rotates a few of the prompt's last tokens run through its own attention."""
    if cached is not None:
        rotation = key_rotation(attn, normed, cached, position_embeddings)
    else:
        rotation = probed_rotation(attn, normed, position_embeddings)
    rotary = plain_rotary(attn, position_embeddings)
    return prerope_keys(attn, normed) if rotary is None else rotate(attn, prerope_keys(attn, normed), *rotary, rotation)
