"""``quickmerge.patch(model)``: token merging inside a vision transformer's blocks, per instance.

    handle = quickmerge.patch(model, r=16)       # ToMe's knob: tokens merged per block
    handle.r = 8; handle.ratio = 0.5             # change at any time
    quickmerge.unpatch(model)                    # or: with quickmerge.patch(model, r=16): ...

The model's classes are never changed: an adapter (one per model family, registered in
:mod:`quickmerge.vision.adapters`) registers forward hooks between the block's own pieces. In
every block, after attention and before the MLP, ``r`` tokens are merged away; the class
and register tokens are never merged; each token's size (original patches it stands for)
is tracked and, with ``prop_attn``, added as ``log(size)`` to the attention logits through
the attention's additive mask, so fused SDPA keeps working.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_positive_int, check_real
from ..compile_guard import guard_hooks
from ..primitives import gather_rows, group_sum, rank01, weighted_mean
from .adapters import REGISTRY, Removable, VisionAdapter, family_hint, find_adapter, mean_by_size, size_bias
from .schedule import r_for_ratio, validate_r
from .token_merge import (
    METHODS,
    SALIENCY_RULES,
    SALIENCY_SOURCES,
    SIMILARITIES,
    attention_saliency,
    in_first_member_order,
    pool_assign,
    quickmerge_assign,
    quickmerge_bipartite_assign,
    random_assign,
    relaxed_bipartite_merge,
    removal_penalty,
    scaled_cost,
    tome_assign,
)
from .token_scorer import ATTRIBUTE as _SCORER_ATTR
from .token_scorer import TokenScorer

_HANDLE_ATTR = "_quickmerge_handle"
# A padding token's weight in a merge: 0 within float32's resolution beside any real token (whose weight is at
# least 1, or epsilon), yet positive, so a group of padding alone has a mean.
_PADDING_WEIGHT = 1e-30


def _choice(name: str, choices: tuple[str, ...]) -> Any:
    return lambda value: check_choice(value, name, choices)


def _flag(name: str) -> Any:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
        return value

    return check


DEFAULT_SALIENCY_QUERIES = 16  # queries of the "queries" saliency (BENCHMARKS.md: stop 70)
DEFAULT_SALIENCY_WEIGHT = {"additive": 0.5, "scaled": 0.125}  # per saliency rule (BENCHMARKS.md: issue 11)
# patch()'s defaults of QuickMerge++'s matching options (None: the rule's weight above; a learned scorer keeps the
# additive rule it is trained with); tests keep the two equal. Since stop 72 the matching stop 47 chose (tokens
# compared by their residual stream, saliency scaling each merge's cost): closer to the unmerged model than
# ToMe-style's and the previous defaults' on every model measured (BENCHMARKS.md, "The chosen matching as the default")
MATCHING_DEFAULTS: dict[str, Any] = {"similarity": "hidden", "saliency_rule": "scaled", "saliency_weight": None,
                                     "saliency": "cls", "saliency_queries": DEFAULT_SALIENCY_QUERIES}
# the defaults before stop 72 (keys, as ToMe; saliency rank subtracted from the similarity): every figure published
# before then, and fine-tune configs that name no matching
LEGACY_MATCHING: dict[str, Any] = {"similarity": "keys", "saliency_rule": "additive"}


def recorded_matching(finetune: Mapping[str, Any]) -> dict[str, Any]:
    """A fine-tune config's ``finetune`` entry with its QuickMerge++ matching filled in: one that names none (before
    stop 48) ran with the defaults of then, :data:`LEGACY_MATCHING`."""
    if finetune.get("method") != "quickmerge":
        return dict(finetune)
    return {**finetune, **{k: v for k, v in LEGACY_MATCHING.items() if finetune.get(k) is None}}


def default_saliency_rule(learned_saliency: bool) -> str:
    """The saliency rule of QuickMerge++'s matching when none is named: a learned saliency (``scorer``) keeps the
    additive rule it is trained with; otherwise :data:`MATCHING_DEFAULTS`'s."""
    return "additive" if learned_saliency else MATCHING_DEFAULTS["saliency_rule"]


def non_default_matching(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The matching options of ``settings`` (command line, fine-tune config) that differ from :func:`patch`'s
    (None: the default)."""
    return {k: settings[k] for k, default in MATCHING_DEFAULTS.items() if settings.get(k) not in (None, default)}


# How merged tokens go back on the patch grid for a dense head (``expand_to_patches``): "residual", each patch its
# group's token plus what its own residual stream lost at each merge; "copy", the group's token alone.
UNMERGE_MODES = ("residual", "copy")

# Every setting of a handle, validated whenever it is assigned (``handle.method = "tome"``).
_SETTINGS: dict[str, Any] = {
    "method": _choice("method", METHODS),
    "saliency": _choice("saliency", SALIENCY_SOURCES),
    "saliency_queries": lambda v: check_positive_int(v, "saliency_queries"),
    "saliency_rule": _choice("saliency_rule", SALIENCY_RULES),
    "similarity": _choice("similarity", SIMILARITIES),
    "matching": _choice("matching", ("bipartite", "greedy")),
    "saliency_weight": lambda v: check_real(v, "saliency_weight", low=0.0, high=math.inf, low_open=False,
                                            high_open=True),
    "epsilon": lambda v: check_real(v, "epsilon (merge-mass floor)", low=0.0, high=1.0, low_open=True,
                                    high_open=False),
    "temperature": lambda v: v if v is None else check_real(v, "temperature", low=0.0, high=math.inf,
                                                            low_open=True, high_open=True),
    "prop_attn": _flag("prop_attn"),
    "trace_source": _flag("trace_source"),
    "size_weighted_pool": _flag("size_weighted_pool"),
    "keep_order": _flag("keep_order"),
    "unmerge": _choice("unmerge", UNMERGE_MODES),
    "keep_deviations": _flag("keep_deviations"),
}


@dataclass
class _Pass:
    """What one forward pass carries from block to block."""

    size: Tensor | None = None  # [B, N] original patches per token (None: all ones; 0: padding)
    padded: bool = False  # the batch has padding tokens (size 0), masked by attention_bias
    origin: Tensor | None = None  # [B, N0] current token of each original token (-1: dropped)
    stages: list[tuple[Tensor, Tensor | None]] = field(default_factory=list)  # (origin, size) entering each block
    # per merge, when kept: (block, origin before it, [B, N, C] each token's stream minus its group's merged token)
    deviations: list[tuple[int, Tensor, Tensor]] | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    scale: float = 1.0


class MergeHandle:
    """Settings and per-pass state of a patched model. Returned by :func:`patch`.

    Attributes that may be changed at any time (validated on assignment): ``r``, ``ratio``, every other setting of
    :func:`patch` but ``scorer`` and ``seed`` (``configure(seed=...)``), and ``keep_deviations``. After a forward
    pass: ``tokens_per_layer`` (tokens entering each block), ``mean_tokens``, ``sizes`` ``[B, N]`` (patches each output
    token stands for; None when nothing merged; 0 for padding) and with ``trace_source`` the ``source`` map ``[B, N0]``
    (final token of each input token, -1 if dropped).
    """

    def __init__(self, model: nn.Module, adapter: VisionAdapter, num_layers: int, num_prefix_tokens: int) -> None:
        self.model, self.adapter = model, adapter
        self.num_layers, self.num_prefix_tokens = num_layers, num_prefix_tokens
        self.has_class_token = adapter.has_class_token(model)
        self._r: Any = 0
        self._ratio: float | None = None
        self.method = "quickmerge"
        self.saliency = "cls"
        self.saliency_queries = DEFAULT_SALIENCY_QUERIES
        self.saliency_rule = MATCHING_DEFAULTS["saliency_rule"]
        self.saliency_weight = DEFAULT_SALIENCY_WEIGHT[self.saliency_rule]
        self.similarity = MATCHING_DEFAULTS["similarity"]
        self.matching = "bipartite"
        self.epsilon = 1.0
        self.temperature: float | None = None
        self.scorer: TokenScorer | None = None
        self.prop_attn = True
        self.trace_source = False
        self.size_weighted_pool = True
        self.keep_order = False
        self.unmerge = "residual"
        self.keep_deviations = False
        self._dense_heads = 0  # open dense readers (a backbone's grid head, a feature-map call): keep deviations
        self.generator = torch.Generator().manual_seed(0)
        self.tokens_per_layer: list[int] = []
        self.source: Tensor | None = None
        self.sizes: Tensor | None = None
        self._stages: list[tuple[Tensor, Tensor | None]] | None = None  # the last pass's (origin, size) per stage
        self._deviations: list[tuple[int, Tensor, Tensor]] | None = None  # the last pass's, when kept
        self.padded = False  # whether the last pass's batch had padding (sizes 0 there)
        self._pass = _Pass()
        self._hooks: list[Any] = []
        self._observers: list[Any] = []  # f(layer, q, k, scale, valid) per block, before merging (calibration)

    # settings -----------------------------------------------------------------------
    @property
    def r(self) -> Any:
        """Tokens merged per block: int, per-layer list or (r, inflect). Setting it clears ``ratio``."""
        return self._r

    @r.setter
    def r(self, value: Any) -> None:
        validate_r(value, self.num_layers)
        self._r, self._ratio = value, None

    @property
    def ratio(self) -> float | None:
        """Fraction of mergeable tokens left after the last block; overrides ``r`` when set."""
        return self._ratio

    @ratio.setter
    def ratio(self, value: float | None) -> None:
        if value is not None:
            r_for_ratio(value, 2, self.num_layers)  # validates
        self._ratio = value

    def __setattr__(self, name: str, value: Any) -> None:
        check = _SETTINGS.get(name)
        super().__setattr__(name, value if check is None else check(value))

    def configure(self, **settings: Any) -> MergeHandle:
        """Set several settings at once (each validated as on assignment); returns self."""
        for name, value in settings.items():
            if name == "seed":
                self.generator.manual_seed(check_positive_int(value, "seed", minimum=0))
            elif name in ("r", "ratio") or name in _SETTINGS:
                setattr(self, name, value)
            else:
                raise TypeError(f"unknown setting {name!r}; settings: r, ratio, seed, {', '.join(_SETTINGS)}")
        self.check_saliency_rule()
        return self

    def check_saliency_rule(self) -> None:
        """Refuse the scaled saliency rule with a learned saliency (a scorer is trained for the additive rule)."""
        if self.saliency_rule == "scaled" and self.scorer is not None:
            raise ValueError("a learned saliency (scorer) is trained with the additive rule; saliency_rule='scaled' "
                             "takes none")

    def schedule(self, num_tokens: int) -> list[int]:
        """Requested r per block for inputs of ``num_tokens`` tokens (before per-layer caps)."""
        if self._ratio is not None:
            return r_for_ratio(self._ratio, num_tokens - self.num_prefix_tokens, self.num_layers)
        return validate_r(self._r, self.num_layers)

    def merges(self) -> bool:
        """Whether the current settings merge any token (a keep ratio below 1, or some block's r above 0)."""
        if self._ratio is not None:
            return self._ratio < 1.0
        return any(r > 0 for r in validate_r(self._r, self.num_layers))

    def drops(self) -> bool:
        """Whether the current method drops tokens (``"random"``) rather than merging them: a dropped patch has no
        stream of its own left to put back."""
        return self.method == "random"

    def needs_qk(self) -> bool:
        """Whether this pass needs the attention's queries and keys: it merges, or an observer reads them."""
        return self.merges() or bool(self._observers)

    def attention_reads(self) -> str:
        """What this pass reads of each block's attention, for an adapter that projects it itself
        (``nn.MultiheadAttention``'s, :mod:`.adapters.multihead`): ``"all"`` (every query and key, per head; an
        observer, or saliency from other queries), ``"class_query"`` (keys per head and the class token's query:
        QuickMerge++ comparing keys), ``"class_logits"`` (only the class token's attention logits over the keys, up
        to a constant per head: QuickMerge++'s default, which compares the residual stream), ``"mean_keys"`` (keys
        averaged over heads: ToMe-style) or ``"none"`` (random, pool)."""
        if self._observers:
            return "all"
        if self.method != "quickmerge":
            return "mean_keys" if self.method == "tome" else "none"
        if not (self.saliency == "cls" and self.has_class_token):
            return "all"
        return "class_logits" if self.similarity == "hidden" else "class_query"

    @property
    def mean_tokens(self) -> float:
        """Mean number of tokens entering a block in the last forward pass."""
        return sum(self.tokens_per_layer) / max(1, len(self.tokens_per_layer))

    # called by adapters -----------------------------------------------------------------
    def begin(self, x: Tensor) -> None:
        """Start of a forward pass (first block's input ``[B, N, C]``)."""
        if torch.is_grad_enabled() and self.adapter.gradient_checkpointing(self.model):
            raise RuntimeError(
                "quickmerge.patch does not support gradient checkpointing: recomputing a block in the backward "
                "pass would merge its tokens a second time. Turn it off (timm: model.set_grad_checkpointing(False); "
                "Hugging Face: model.activation_checkpointing_disable(), before transformers 5.24 "
                "model.gradient_checkpointing_disable()) or run without gradients."
            )
        b, n, _ = x.shape
        self._schedule = self.schedule(n)
        self.tokens_per_layer = []
        # the current token of every input token: the source map, and the patches a rotary table averages over
        keep = self.keep_deviations or (self.unmerge == "residual" and self._dense_heads > 0)
        self._pass = _Pass(origin=torch.arange(n, device=x.device).expand(b, n), deviations=[] if keep else None)
        self.source, self.sizes, self.padded, self._stages, self._deviations = None, None, False, None, None

    def kept_deviations(self) -> bool:
        """Whether the last pass kept what ``expand_to_patches(..., residual=True)`` reads (a dense head was open,
        or ``keep_deviations``), for a merged pass; False when it merged nothing."""
        return self._deviations is not None

    def dense_head(self) -> Removable:
        """Declare a reader that puts this model's tokens back on the patch grid (a backbone's head, a feature-map
        call): while it is open, passes keep what :meth:`expand_to_patches` needs for ``unmerge="residual"``.
        ``remove()`` closes it."""
        self._dense_heads += 1
        return _DenseHead(self)

    def set_padding(self, valid: Tensor) -> None:
        """Mark this pass's padding tokens (``valid [B, N]`` bool, False = padding; prefix tokens must be valid).

        Called by an adapter right after :meth:`begin`, for models that pad a batch of images of different
        sizes to one length (SigLIP 2's NaFlex). A padding token gets size 0: it weighs nothing in a merge or a
        pool, it is merged (or dropped) before any real token, since that costs nothing, and
        :meth:`attention_bias` masks it in every block from then on, in place of the model's own mask, which
        was made for the unmerged tokens (:meth:`has_padding`)."""
        st = self._pass
        if st.origin is None or st.size is not None:
            raise RuntimeError("set_padding must be called at the start of a pass, after begin and before a merge")
        if valid.dtype != torch.bool or tuple(valid.shape) != tuple(st.origin.shape):
            raise ValueError(f"valid must be a bool mask of shape {tuple(st.origin.shape)} (one entry per token of the "
                             f"first block's input), got {valid.dtype} {tuple(valid.shape)}")
        st.size, st.padded = valid.to(torch.float32), True

    def has_padding(self) -> bool:
        """Whether this pass masks padding: the adapter then replaces the model's own attention mask with
        :meth:`attention_bias` rather than adding the two."""
        return self._pass.padded

    def enter_block(self, x: Tensor) -> None:
        self.tokens_per_layer.append(x.shape[1])
        self._pass.stages.append((self._pass.origin, self._pass.size))

    def attention_bias(self, x: Tensor) -> Tensor | None:
        """Additive mask ``[B, 1, 1, N]``: log(size) for proportional attention (-inf on padding), 0 / -inf for
        padding alone without it, else None."""
        weights = self._key_weights()
        return None if weights is None else size_bias(weights, x.dtype)

    def _key_weights(self) -> Tensor | None:
        """``[B, N]`` float32 weights whose log each key's logit gets: sizes (proportional attention; padding 0), 1
        per real token and 0 on padding without it, or None (no bias)."""
        st = self._pass
        if st.size is None or not (self.prop_attn or st.padded):
            return None
        return st.size if self.prop_attn else (st.size > 0).float()

    def record_qk(self, q: Tensor | None = None, k: Tensor | None = None, scale: float | None = None) -> None:
        """Queries/keys ``[B, H, N, hd]`` of the current block's attention."""
        if q is not None:
            self._pass.q = q
        if k is not None:
            self._pass.k = k
        if scale is not None:
            self._pass.scale = scale

    def merge(self, layer: int, x: Tensor) -> Tensor | None:
        """Merge the residual stream ``x [B, N, C]`` after attention; None when nothing merges."""
        p, st = self.num_prefix_tokens, self._pass
        b, n, _ = x.shape
        m = n - p
        r = self._schedule[layer] if layer < len(self._schedule) else 0
        bipartite = self.method == "tome" or (self.method == "quickmerge" and self.matching == "bipartite")
        r = min(r, m // 2 if bipartite else m - 1)
        if self._observers:
            valid = st.size > 0 if st.padded else None
            for observe in self._observers:
                observe(layer, st.q, st.k, st.scale, valid)
        if r <= 0:
            st.q = st.k = None
            return None
        size = st.size if st.size is not None else x.new_ones(b, n, dtype=torch.float32)
        weight = size[:, p:]
        padding = (weight == 0) if st.padded else None  # merged or dropped before any real token
        if self.method in ("quickmerge", "tome"):
            if st.k is None:
                raise RuntimeError("the attention's keys were not captured; the adapter's hooks did not run")
            keys = st.k.contiguous()  # a strided view of qkv; one copy makes the reductions below ~3x faster
            if self.method == "quickmerge" and self.similarity == "hidden":
                metric = x[:, p:]  # [B, m, C] the residual stream that is about to be averaged
            else:
                metric = keys.mean(dim=1)[:, p:]  # [B, m, hd] keys averaged over heads, as ToMe
        if self.method == "quickmerge":
            weights = self._key_weights()
            log_size = None if weights is None else weights.log()
            source = "queries" if self.saliency == "cls" and not self.has_class_token else self.saliency
            sal = attention_saliency(st.q, keys, st.scale, log_size, source, self.saliency_queries,
                                     valid=(size > 0) if st.padded else None)[:, p:]  # no gradient
            keep = self.scorer(layer, x[:, p:]) if self.scorer is not None else None
            if self.epsilon < 1.0:
                weight = weight * (self.epsilon + (1.0 - self.epsilon) * rank01(sal))
            if self.temperature is not None and self.matching == "bipartite" and self.model.training \
                    and torch.is_grad_enabled():
                if st.padded:
                    raise ValueError("merge-aware training (temperature) does not take padded batches: pass "
                                     "images of one size without a padding mask, or train without temperature")
                scaled = self.saliency_rule == "scaled"
                merged, dst = relaxed_bipartite_merge(
                    x[:, p:], weight, metric, None if scaled else removal_penalty(sal, self.saliency_weight, keep), r,
                    self.temperature, self.generator,
                    cost_scale=scaled_cost(sal, self.saliency_weight, keep) if scaled else None)
                if self.keep_order:
                    dst, order = in_first_member_order(dst, m - r)
                    merged = gather_rows(merged, order)
                return self._finish(x, merged, dst, size, r)
            if self.matching == "bipartite":
                dst = quickmerge_bipartite_assign(metric, sal, r, self.saliency_weight, keep, self.saliency_rule,
                                                  padding)
            else:
                dst = quickmerge_assign(metric, sal, r, self.saliency_weight, keep_score=keep, rule=self.saliency_rule,
                                        padding=padding)
        elif self.method == "tome":
            dst = tome_assign(metric, r, padding)
        elif self.method == "random":
            dst = random_assign(b, m, r, x.device, self.generator, padding)
        elif self.method == "pool":
            dst = pool_assign(b, m, r, x.device)
        else:
            raise AssertionError(self.method)  # unreachable: validated on assignment
        if self.keep_order:  # renumbered before the means, which then come in patch order with no extra copy;
            dst, _ = in_first_member_order(dst, m - r)  # sizes, sources, unmerge maps and positions follow dst
        if padding is not None:  # a group of padding alone still needs a weight to average by
            weight = weight.clamp_min(_PADDING_WEIGHT)
        merged, _ = weighted_mean(x[:, p:], weight, dst, m - r)
        return self._finish(x, merged, dst, size, r)

    def _finish(self, x: Tensor, merged: Tensor, dst: Tensor, size: Tensor, r: int) -> Tensor:
        """Track sizes and sources of the merge ``dst`` and return the new residual stream."""
        p, st = self.num_prefix_tokens, self._pass
        b, n, _ = x.shape
        k_new = n - p - r
        kept_size = (size[:, p:] * (dst >= 0))[..., None]  # dropped tokens take their size with them
        new_size = group_sum(kept_size, dst.clamp_min(0), k_new)[..., 0]
        st.size = torch.cat([size[:, :p], new_size], dim=1)
        full = torch.cat([torch.arange(p, device=x.device).expand(b, p), torch.where(dst >= 0, dst + p, -1)], 1)
        out = torch.cat([x[:, :p], merged], dim=1)
        if st.deviations is not None:  # what each token's stream loses to its group's mean (0 for a dropped one)
            back = gather_rows(out, full.clamp_min(0))
            st.deviations.append((len(st.stages) - 1, st.origin, (x - back).masked_fill_((full < 0)[..., None], 0)))
        st.origin = torch.where(st.origin >= 0, full.gather(1, st.origin.clamp_min(0)), -1)
        st.q = st.k = None
        return out

    def mean_over_patches(self, table: Tensor) -> Tensor:
        """A per-patch table of the pass's input for its current tokens, each token's row the mean of its patches'.

        ``table [..., N0, D]`` has one row per patch token the pass began with (prefix tokens have none) and
        leading dims ``()``, ``[H]`` or ``[B or 1, H or 1]``: a rotary embedding's sin and cos, whose rotation is
        linear in them, so a merged token is turned by the mean of its patches' rotations (its logit with a
        query is the mean of theirs, had they the same content). Returns ``[B, H or 1, N, D]`` for the ``N``
        current patch tokens (dropped patches left out), in ``table``'s dtype; ``table`` itself before any merge.
        """
        st, p = self._pass, self.num_prefix_tokens
        if st.size is None:
            return table
        patches = st.origin.shape[1] - p
        if not 2 <= table.dim() <= 4 or table.shape[-2] != patches:
            raise ValueError(f"a per-patch table must be [..., {patches}, D] with at most two leading dims (one row "
                             f"per patch token of the pass), got {tuple(table.shape)}")
        b, k = st.size.shape[0], st.size.shape[1] - p
        rows = table.reshape((1,) * (4 - table.dim()) + tuple(table.shape))  # [B or 1, L, N0, D]
        lead, d = rows.shape[1], rows.shape[3]
        group = st.origin[:, p:] - p
        group = torch.where(group >= 0, group, k)  # dropped patches go to a spare group, cut below
        values = rows.expand(b, lead, patches, d).permute(0, 2, 1, 3).reshape(b, patches, lead * d).float()
        sums = group_sum(values, group, k + 1)[:, :k]
        counts = group_sum(values.new_ones(b, patches, 1), group, k + 1)[:, :k]
        return (sums / counts).view(b, k, lead, d).permute(0, 2, 1, 3).to(table.dtype)

    def end(self) -> None:
        """End of a forward pass: publish sizes, the source map and each stage's map (for ``expand_to_patches``);
        drop the pass's other references."""
        self.sizes, self.padded = self._pass.size, self._pass.padded
        st = self._pass
        self._stages = None if st.size is None else [*st.stages, (st.origin, st.size)]
        self._deviations = None if st.size is None else st.deviations
        if self.trace_source:
            self.source = self._pass.origin
        self._pass = _Pass()

    def end_open_pass(self) -> None:
        """End a pass that stopped before its last block (``forward_intermediates(stop_early=True)``): its stages
        so far are published as :meth:`end` would; nothing if no pass is open."""
        if self._pass.origin is not None:
            self.end()

    def pooling_weights(self, x: Tensor) -> Tensor | None:
        """Weights ``[B, N]`` for an average-pooling head over the output tokens ``x [B, N, C]``: each token's
        size, so the mean is the one over the original patches (with ``size_weighted_pool`` off, 1 per real
        token and 0 on padding); None when unweighted means are right (nothing merged, ``size_weighted_pool``
        off without padding) or ``x`` is not the last pass's output."""
        if self.sizes is None or tuple(self.sizes.shape) != tuple(x.shape[:2]):
            return None
        if not self.size_weighted_pool:
            return (self.sizes > 0).float() if self.padded else None
        return self.sizes

    def expand_to_patches(self, x: Tensor, stage: int | None = None, residual: bool = False) -> Tensor | None:
        """Tokens ``x [B, N, C]`` of the last pass put back on the pass's ``N0`` input positions, ``[B, N0, C]``.

        ``stage``: which tokens ``x`` holds, those entering block ``stage`` (0: the first block's input,
        ``num_layers``: the last block's output, the default), as a model's ``hidden_states[stage]``. Prefix tokens
        stay as they are and every patch (padding included) takes the row of the token it was merged into, so a
        plain mean over the patches is the size-weighted mean of the tokens (an unmerge); a dropped patch
        (``method="random"``) takes that size-weighted mean, which keeps it so. None when the pass merged nothing;
        ``x`` itself for a stage before any merge. Raises ValueError if ``x`` has not that stage's token count.

        ``residual=True``: each patch also gets back, for every merge before ``stage``, how its token's residual
        stream differed from the merged token of its group (the residual stream just before that merge, less what
        the blocks after added to the group), so ``x`` must be the residual stream itself, before any final norm.
        Needs the pass's deviations: quickmerge keeps them in the passes a dense head reads (``unmerge``), or set
        ``keep_deviations`` (memory: about that of every block's hidden states)."""
        if residual and self._stages is not None and self._deviations is None:
            raise ValueError("residual=True needs the last pass's deviations: set handle.keep_deviations = True "
                             "before the forward pass (quickmerge keeps them itself for a dense head it drives)")
        if self._stages is None:
            return None
        stage = len(self._stages) - 1 if stage is None else stage
        if not 0 <= stage < len(self._stages):
            raise ValueError(f"stage must be in [0, {len(self._stages) - 1}] (the blocks' inputs, then the last "
                             f"block's output), got {stage}")
        origin, sizes = self._stages[stage]
        tokens = origin.shape[1] if sizes is None else sizes.shape[1]
        if tuple(x.shape[:2]) != (origin.shape[0], tokens):
            raise ValueError(f"stage {stage} of the last pass has {tokens} tokens per image for a batch of "
                             f"{origin.shape[0]}; got x of shape {tuple(x.shape)}")
        if sizes is None:
            return x
        p = self.num_prefix_tokens
        rows = gather_rows(x, origin.clamp_min(0))
        dropped_value = mean_by_size(x[:, p:], sizes[:, p:]).to(x.dtype)  # [B, C]
        rows = torch.where((origin >= 0)[..., None], rows, dropped_value[:, None])
        if residual:  # each merge before this stage: the patch's token's deviation then, found by its origin then
            for block, before, deviation in self._deviations:
                if block < stage:
                    rows = rows + gather_rows(deviation, before.clamp_min(0)).to(x.dtype)
        return rows

    # lifetime -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook and restore the model (same as :func:`unpatch`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.scorer is not None and self.model._modules.get(_SCORER_ATTR) is self.scorer:
            del self.model._modules[_SCORER_ATTR]
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)

    def __enter__(self) -> MergeHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        how = f"ratio={self._ratio}" if self._ratio is not None else f"r={self._r!r}"
        return (f"MergeHandle({type(self.model).__name__}, {how}, method={self.method!r}, "
                f"layers={self.num_layers}, prefix_tokens={self.num_prefix_tokens})")


class _DenseHead:
    """An open dense reader of a handle (:meth:`MergeHandle.dense_head`); ``remove()`` closes it once."""

    def __init__(self, handle: MergeHandle) -> None:
        self.handle: MergeHandle | None = handle

    def remove(self) -> None:
        if self.handle is not None:
            self.handle._dense_heads -= 1
            self.handle = None


def _press_hint(model: nn.Module) -> str:
    """For a class the presses support (a causal language or vision-language model), where its tokens do merge."""
    from ..text.decoder import SUPPORTED_ARCHITECTURES

    if not any(c.__name__ in SUPPORTED_ARCHITECTURES for c in type(model).__mro__):
        return ""
    hint = ("; it is a causal language model of quickmerge.text.SUPPORTED_ARCHITECTURES: QuickMergePress merges its "
            "KV cache, QuickMergeInputPress its prompt's tokens")
    config = getattr(model, "config", None)
    if getattr(config, "vision_config", None) is None:
        return hint
    video = " (a clip's: video_token_id)" if getattr(config, "video_token_id", None) is not None else ""
    return hint + (f", its image tokens alone with token_ids=(model.config.image_token_id,){video} and layer=-1 "
                   "before the language model reads them (a vision tower merged alone would hand the projector fewer "
                   "features than the prompt has image tokens)")


def patch(
    model: nn.Module,
    r: Any = 0,
    *,
    ratio: float | None = None,
    method: str = "quickmerge",
    prop_attn: bool = True,
    trace_source: bool = False,
    size_weighted_pool: bool = True,
    keep_order: bool = False,
    unmerge: str = "residual",
    saliency: str = "cls",
    saliency_queries: int = DEFAULT_SALIENCY_QUERIES,
    saliency_weight: float | None = None,
    saliency_rule: str | None = None,
    similarity: str = MATCHING_DEFAULTS["similarity"],
    matching: str = "bipartite",
    epsilon: float = 1.0,
    temperature: float | None = None,
    scorer: TokenScorer | None = None,
    seed: int = 0,
) -> MergeHandle:
    """Patch ``model`` in place to merge tokens in its blocks; returns a :class:`MergeHandle`.

    Args:
        model: a timm ``VisionTransformer``, ``Eva`` (rotary positions: EVA-02, DINOv3, RoPE-ViT) or ``NaFlexVit``
            (image or NaFlex batches, padding masked); a Hugging
            Face ViT, DeiT, DINOv2, DINOv2-with-registers, DINOv3, I-JEPA, ViT-MSN or ViT-MAE model, a VideoMAE or
            ViViT video model, a CLIP, SigLIP, AIMv2, BLIP, BLIP-2 or InstructBLIP vision tower (also
            ``CLIPModel.vision_model``), a whole BLIP, BLIP-2 or InstructBLIP model (what reads the tower, by
            size), an OpenCLIP image tower, ``model.visual``, or a torchvision ``VisionTransformer`` (``vit_b_16`` and
            kin) (``quickmerge.vision.adapters.supported_families()``; other subclasses of these families work with a
            warning). Heads that need every patch on its grid (``Dinov2Backbone``, feature maps, masked image
            modeling, the pre-training decoders of VideoMAE and MAE) get the tokens unmerged (``unmerge``).
        r: tokens merged per block (int), one int per block, or ToMe's ``(r, inflect)``; as in
            ToMe, a block merges at most half its tokens by bipartite matching (all but one
            otherwise), and ``handle.tokens_per_layer`` shows what each block kept.
        ratio: alternatively, the fraction of patch tokens left after the last block.
        method: ``"quickmerge"`` (default), ``"tome"``, ``"random"`` (drop) or ``"pool"``.
        prop_attn: add log(size) to attention logits (proportional attention). Hugging Face models
            take it with eager or SDPA attention; with ``flex_attention`` patch with False (flash
            attention is refused).
        trace_source: record which input token ended in which output token (``handle.source``).
        size_weighted_pool: heads that average the output tokens (timm ``global_pool="avg"`` or
            ``"avgmax"``, DINOv2's classification heads, VideoMAE's mean-pooled classifier) average over the original
            patches (each token weighted by its size, as ToMe does for MAE models, or each patch's own stream,
            ``unmerge``), and attention-pooling heads (SigLIP's, timm's ``"map"``) add log(size) to their logits;
            False: the heads see merged tokens as they are.
        keep_order: each merged token takes the place of its first member, so the tokens stay in patch order
            inside the blocks (bipartite matching otherwise puts one alternate set's kept tokens before the other
            set's; the other methods keep their kept tokens in order already). For blocks that read token order;
            it changes which tokens the next block's alternating sets hold (measured: BENCHMARKS.md, "Tokens in
            patch order").
        unmerge: how a dense head quickmerge drives (``Dinov2Backbone`` / ``DINOv3ViTBackbone`` under DPT or
            Depth Anything, timm's and OpenCLIP's ``forward_intermediates`` feature maps, ViT / DeiT masked image
            modeling) gets every patch back, and what a head that norms every token before averaging them
            (timm's and Eva's ``"avg"`` / ``"avgmax"`` after the final norm, OpenCLIP's ``pool_type="avg"`` before
            ``ln_post``, DINOv2's, SigLIP's and SigLIP 2's classifiers) averages:
            ``"residual"`` (default: each patch its group's token plus what its own residual stream lost at each
            merge, kept for those passes only; +0.1 to +3.4 points of mIoU over copying on a dense proxy, 35-60%
            less KL to the unmerged model for an average-pooled classifier, BENCHMARKS.md) or
            ``"copy"`` (the group's token alone, ToMe for Stable Diffusion's unmerge; for a pooling head the
            size-weighted mean of the tokens).
        saliency: ``"cls"`` (class token's query; models without one use ``"queries"``),
            ``"queries"`` (``saliency_queries`` queries spread over the image) or ``"mean"`` (one query, the mean of
            all tokens' queries over the patches).
        saliency_queries: how many queries, evenly spread over the tokens, the ``"queries"`` saliency asks
            (default 16; all tokens when there are fewer). Its cost grows with the count: on a video model
            without a class token it is most of what QuickMerge++'s merge step adds to ToMe's (BENCHMARKS.md,
            "How many queries the saliency asks").
        saliency_weight: how strongly saliency protects a token from being merged away (default: 0.125 with
            the scaled rule, 0.5 with the additive one, the weights measured).
        saliency_rule: how saliency enters the matching: ``"scaled"`` (default: a pair costs its
            dissimilarity ``1 - cos`` times ``1 + saliency_weight * n * (s_a + s_b)``: the cost grows with the
            attention both receive, so near-duplicates merge even when salient; every matching and the
            differentiable merge) or ``"additive"`` (the cosine similarity minus ``saliency_weight`` times the
            source's saliency rank; the default before stop 72, and with a learned ``scorer``, which is
            trained with it and takes no other).
        similarity: what QuickMerge++'s matching compares by cosine: ``"hidden"`` (default: the residual
            stream after attention, the tokens that are averaged) or ``"keys"`` (the attention keys averaged
            over heads, as ToMe; the default before stop 72). With the scaled rule, ``"hidden"`` was
            closer to the unmerged model's outputs than ToMe-style matching and than keys with the additive
            rule on every model measured (BENCHMARKS.md, "The chosen matching as the default").
        matching: ``"bipartite"`` (default: ToMe's alternating sets, each token's best-match
            score lowered by its saliency) or ``"greedy"`` (the r most redundant tokens join
            their nearest kept token; measured slightly worse, BENCHMARKS.md).
        epsilon: merge-mass floor in (0, 1]; 1 gives size-weighted means (ToMe's), smaller
            values weight each token by ``size * (eps + (1 - eps) * saliency rank)``.
        temperature: QuickMerge++'s differentiable merge for merge-aware training: while the
            model is in training mode with gradients on, the bipartite merge samples its merges
            with Gumbel noise of this scale and passes gradients through the relaxed K-hot
            removal mask (:func:`~quickmerge.vision.token_merge.relaxed_bipartite_merge`);
            evaluation stays hard and noise-free. None (default): always hard.
        scorer: a learned saliency (:class:`~quickmerge.vision.token_scorer.TokenScorer`, one weight row per
            block) whose keep scores protect tokens under ``method="quickmerge"``; registered as
            ``model.quickmerge_scorer`` (moved to the model's device) until unpatched, so it trains with the model.
        seed: seed of the random method's (and the Gumbel noise's) generator.
    Raises:
        TypeError if the model is of no supported family or already patched; ValueError on bad settings.

    ``torch.compile``: a patched model compiles whole (the hooks trace into its graph) and recompiles when the
    handle's settings change or it is unpatched. TorchDynamo does not guard on module hooks by default, so the
    first patch in a process turns those guards on and, if graphs were compiled before, clears them with a
    warning (:mod:`quickmerge.compile_guard`); patch before compiling to avoid the retrace.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise TypeError(f"{type(model).__name__} is already patched; call quickmerge.unpatch(model) first")
    adapter = find_adapter(model)
    if adapter is None:
        # a dual encoder (OpenCLIP's CLIP, Hugging Face's CLIPModel / SiglipModel): its image tower is what merges;
        # timm's features_only wrapper (FeatureGetterNet): the ViT it holds as .model
        inner = [name for name in ("visual", "vision_model", "model")
                 if isinstance(getattr(model, name, None), nn.Module) and find_adapter(getattr(model, name))]
        what = "the model it wraps" if inner[:1] == ["model"] else "its image tower"
        hint = f"; {what} is supported: quickmerge.patch(model.{inner[0]})" if inner else _press_hint(model)
        families = "; ".join(a.name for a in REGISTRY)
        raise TypeError(
            f"quickmerge.patch supports {len(REGISTRY)} model families ({families}); the "
            f"{sum(len(a.tested_classes) for a in REGISTRY)} tested classes are {family_hint(model)}; "
            f"got {type(model).__module__}.{type(model).__name__}{hint}"
        )
    blocks = adapter.blocks(model)  # raises on a structure the adapter cannot hook, before any warning
    if type(model).__name__ not in adapter.tested_classes:
        warnings.warn(f"{type(model).__name__} is not among the {len(adapter.tested_classes)} tested classes of "
                      f"the {adapter.name} family ({family_hint(model, adapter)}); check its outputs with r=0 "
                      "against the unpatched model", stacklevel=2)
    if scorer is not None:
        if not isinstance(scorer, TokenScorer):
            raise TypeError(f"scorer must be a quickmerge.vision.TokenScorer, got {type(scorer).__name__}")
        if scorer.num_layers != len(blocks):
            raise ValueError(f"scorer has {scorer.num_layers} layers, the model {len(blocks)} blocks")
        if saliency_rule == "scaled":
            raise ValueError("a learned saliency (scorer) is trained with the additive rule; saliency_rule='scaled' "
                             "takes none")
        if hasattr(model, _SCORER_ATTR):
            raise TypeError(f"{type(model).__name__} already has an attribute {_SCORER_ATTR!r}")
    if saliency_rule is None:
        saliency_rule = default_saliency_rule(scorer is not None)
    if saliency_weight is None:
        saliency_weight = DEFAULT_SALIENCY_WEIGHT.get(saliency_rule, 0.5)  # an unknown rule is refused below
    handle = MergeHandle(model, adapter, len(blocks), adapter.num_prefix_tokens(model))
    handle.configure(r=r, method=method, prop_attn=prop_attn, trace_source=trace_source,
                     size_weighted_pool=size_weighted_pool, keep_order=keep_order, unmerge=unmerge, saliency=saliency,
                     saliency_queries=saliency_queries, saliency_weight=saliency_weight, saliency_rule=saliency_rule,
                     similarity=similarity, matching=matching, epsilon=epsilon, temperature=temperature, seed=seed)
    if ratio is not None:
        handle.ratio = ratio
    handle._hooks = adapter.attach(model, blocks, handle)  # may still refuse, before it registers anything
    if scorer is not None:
        param = next(model.parameters(), None)
        model.add_module(_SCORER_ATTR, scorer.to(param.device) if param is not None else scorer)
        handle.scorer = scorer
    guard_hooks()  # a graph compiled before this patch must not run the patched model (compile_guard.py)
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`; raises ValueError if the model is not patched."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError(f"{type(model).__name__} is not patched by quickmerge")
    handle.remove()


def get_handle(model: nn.Module) -> MergeHandle | None:
    """The handle of a patched model, or None."""
    return getattr(model, _HANDLE_ATTR, None)

