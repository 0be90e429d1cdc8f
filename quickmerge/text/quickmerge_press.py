"""``QuickMergePress``: QuickMerge++ merging (rather than evicting) a causal LM's KV cache.

Used like a kvpress press::

    with QuickMergePress(compression_ratio=0.5)(model):
        model(context_ids, past_key_values=cache)            # prefill: the cache is merged
        model(next_ids, past_key_values=cache)               # decode: proportional attention

Each layer's entries are scored by the attention they receive from the prompt's last
``window`` queries, each query weighted by how focused it is (QuickMerge++'s entropy
saliency, :func:`~quickmerge.text.scoring.window_saliency`). Per KV head the top entries
seed groups that every other entry joins by cosine similarity of keys (the cache has no
order to keep; ``mode="spans"`` merges contiguous spans instead); each group becomes one
entry holding the mass-weighted mean of its keys and values and remembers its size, which
the base press turns into proportional attention.

``decoding_size=S`` keeps merging while the model decodes inside the press: every layer decoding fills to
``S + decoding_interval`` entries is merged back to ``S`` (:mod:`quickmerge.text.decoding`).

For prompts that later text copies from, ``scoring="replay"`` rates entries by how the model
reads the whole prompt again (:mod:`quickmerge.text.replay`) and ``head_budgets=True`` lets
each layer's KV heads keep different numbers of entries at equal memory
(:mod:`quickmerge.text.flat`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_choice, check_positive_int, check_real
from ..budget import allocate
from ..merging import assign_to_seeds, cluster_by_similarity, contiguous_spans, merge_mass, spans_along_time
from ..primitives import group_sum, quantile_rank, rank01, top_indices, weighted_mean
from .alignment import fit_keys, fit_values, read_weights
from .cache import cache_arg, is_merged, merged_layer, physical_length
from .decoder import (
    UnsupportedAttentionError,
    hidden_states_arg,
    logit_cap_and_sinks,
    prerope_keys,
    sliding_window_of,
    unsupported_message,
)
from .decoding import QueryBuffer, entry_sizes, remerge
from .flat import select_and_merge
from .kv_press import Compressed, KVPress
from .latent import attended_keys, is_latent_attention, per_cache_row
from .replay import replay_inputs, replay_scores
from .scoring import (
    SALIENT,
    Salient,
    Window,
    key_leverage,
    key_novelty,
    neighbourhood_max,
    observe,
    prompt_saliency,
    saliency,
    spread,
)

DECODING_WINDOW_SHARE = 3  # the default decoding_window: decoding_size // 3 (BENCHMARKS.md, stop 91)


@dataclass
class QuickMergePress(KVPress):
    """Merge (rather than evict) KV-cache entries during prefill.

    Args:
        compression_ratio: share of KV entries removed, in [0, 1); kept = int(L * (1 - ratio)),
            as kvpress computes it.
        window: observation window, the last ``window`` prompt tokens whose queries score the keys.
            Their own entries always seed a group.
        salient: how window queries are weighted: ``"low_entropy"`` (focused queries count more),
            ``"high_entropy"``, or ``"uniform"``.
        epsilon: merge mass of non-selected entries, in (0, 1].
        saliency_weight: ``mode="spans"`` only: how strongly span boundaries are drawn around
            salient entries.
        proportional: add log(group size) to merged entries' attention logits while the press is active.
        mode: ``"clusters"`` (entries join their most similar seed) or ``"spans"`` (contiguous spans).
        time_period: video, ``mode="spans"`` only: tokens per frame; spans then run along time, over
            the same location in consecutive frames (:func:`~quickmerge.merging.time_major_order`),
            so a static background merges across frames and moving parts stay apart.
        time_offset: tokens before the first frame (a BOS), kept out of the frame grid.
        kmeans_iters: centre updates after the seed assignment (clusters mode; 0 = pure seeding).
        bias: what proportional attention counts: ``"size"`` (members) or ``"mass"`` (total merge
            mass relative to the heaviest member).
        kernel_size: width of the average pooling that spreads each score to its neighbours.
        budget: ``"uniform"`` (every layer keeps ``int(L * (1 - ratio))``) or ``"entropy"``
            (QuickMerge++'s entropy-based budget across layers: each layer's share grows with the
            number of entries its window queries effectively attend to, ``exp(entropy)``, to the
            power ``budget_power``, above a floor of ``budget_floor`` times the uniform share; the
            total kept is the uniform total, so memory is equal; the cache stays whole until the
            end of the prefill).
        align: fit the merged keys and values to what the window's queries read from the full
            cache (:mod:`quickmerge.text.alignment`): keys keep each group's log-sum-exp, values
            weigh members by the attention they receive (plus ``align_floor``).
        align_ridge: regularisation of the key fit, relative to the queries' energy.
        novelty: weight of key novelty in the seed choice, query-agnostic: an entry whose key is
            unlike every other entry's (:func:`~quickmerge.text.scoring.key_novelty`: a fact stated
            once) gets ``novelty x`` its novelty rank added to its saliency rank, so it keeps a
            group of its own instead of being averaged into a dissimilar seed. 0 (default): off.
        scoring: what rates the entries: ``"window"`` (the last ``window`` queries, above) or
            ``"replay"`` (:mod:`quickmerge.text.replay`: the model reads the prompt once more after
            ``replay_prefix`` and each entry scores the most attention a re-reading query pays it;
            query-agnostic, finds facts that only a later copy needs, at the cost of a second pass
            over the prompt; the first ``sinks`` entries always seed a group), or ``"prompt"``
            (:func:`~quickmerge.text.scoring.prompt_saliency`: every prompt query's attention, weighted by
            ``salient``, divided by the weight of the queries that see each entry; no second pass).
        replay_prefix: token ids read before the replayed prompt (e.g. an instruction to repeat it).
        sinks: ``scoring="replay"``: leading entries that always seed a group (attention sinks).
        recent: ``scoring="replay"``: trailing entries that always seed a group (e.g. the last frame of a video,
            which the next frame reads almost whole); 0 (default): none. A layer whose budget cannot hold
            ``sinks`` and ``recent`` is refused (ValueError) rather than cut into them.
        replay_pool: ``scoring="replay"``: each entry's replay score becomes the largest within
            ``replay_pool`` neighbouring positions (odd width) before budgets and selection, so an
            entry the re-reading attends to keeps the words around it (a key with its sentence
            rather than its digits alone); 1 (default): off.
        head_budgets: ``scoring="replay"``: the KV heads of a layer share its budget by their replay
            scores (a copying head keeps most of the prompt, its neighbours a few entries), at equal
            memory: the layer's entries are folded into one row (:mod:`quickmerge.text.flat`), which
            needs eager or SDPA attention and decoding inside the press.
        leverage: ``scoring="replay"``: share of each head's even budget (``int(L * (1 - ratio))``)
            reserved, before the replay scores fill the rest, for the entries whose pre-RoPE keys have
            the highest ridge leverage (:func:`~quickmerge.text.scoring.key_leverage`): query-agnostic
            outliers such as a number stated once in prose, which a re-reading may pass over. 0
            (default): off.
        leverage_ridge: the leverage's ridge, relative to the keys' mean eigenvalue.
        leverage_pool: each entry's leverage becomes the largest within ``leverage_pool`` neighbouring
            positions (odd width) before the reserve is chosen, so the reserve goes to spans around the
            strongest outliers (a number with its sentence) rather than to scattered tokens; 1 (default): off.
        budget ``"replay"``: with ``scoring="replay"``, each layer keeps as many entries as it holds
            among the model's most attended (layer, head, entry) triples (KVzip's split over layers),
            above the same floor; the total stays the uniform total.
        decoding_size: merge while decoding too (kvpress's ``DecodingPress``, :mod:`quickmerge.text.decoding`):
            once decoding inside the press has filled a full-attention layer to ``decoding_size +
            decoding_interval`` entries per KV head, it is merged back to ``decoding_size``, scored by the last
            ``decoding_window`` decoded queries, entries weighted by the tokens they stand for. None (default): the
            cache grows by one entry per generated token. Needs ``proportional=True`` with ``bias="size"`` (the sizes
            carry what each entry stands for) and ``head_budgets=False``.
        decoding_interval: decoded tokens between two merges (the cache stays within ``decoding_size`` and
            ``decoding_size + decoding_interval`` entries once it reaches them).
        decoding_window: while decoding, the last ``decoding_window`` decoded tokens' queries score the entries at
            each merge, and their own entries stay whole (``window`` is the prompt's). None (default): a third of
            ``decoding_size`` (at least 1), chosen on development text windows (BENCHMARKS.md, stop 91). A value of
            ``decoding_size`` or more is refused: it would leave nothing to merge into.
    On multi-head latent attention (DeepSeek V2/V3, ...) ``align``, ``head_budgets`` and ``leverage``, which fit or
    split each head's keys, are refused: from transformers 5.15 such a layer caches one latent row for all its heads.
    After a prefill, ``original_length``, ``compressed_length`` and ``achieved_ratio`` report
    what was done, and ``seed_share()`` how often each prompt token was kept as a seed;
    ``decoding_merges`` counts the layers merged while decoding since the prefill.
    """

    window: int = 16
    salient: Salient = "low_entropy"
    epsilon: float = 0.03
    saliency_weight: float = 1.0
    proportional: bool = True
    mode: Literal["clusters", "spans"] = "clusters"
    time_period: int | None = None
    time_offset: int = 0
    kmeans_iters: int = 0
    bias: Literal["size", "mass"] = "size"
    kernel_size: int = 5
    budget: Literal["uniform", "entropy", "replay"] = "uniform"
    budget_floor: float = 0.2
    budget_power: float = 1.0
    align: bool = False
    align_ridge: float = 0.1
    align_floor: float = 0.5
    novelty: float = 0.0
    scoring: Literal["window", "replay", "prompt"] = "window"
    replay_prefix: tuple[int, ...] = ()
    sinks: int = 4
    recent: int = 0
    replay_pool: int = 1
    head_budgets: bool = False
    leverage: float = 0.0
    leverage_ridge: float = 1.0
    leverage_pool: int = 1
    decoding_size: int | None = None
    decoding_interval: int = 512
    decoding_window: int | None = None
    decoding_merges: int = field(default=0, init=False)
    kept_share: Tensor | None = field(default=None, init=False, repr=False)
    layers_merged: int = field(default=0, init=False, repr=False)
    _windows: dict[int, Window] = field(default_factory=dict, init=False, repr=False)
    _replayed: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)
    _leverages: dict[int, Tensor] = field(default_factory=dict, init=False, repr=False)
    _decoded_queries: QueryBuffer = field(default_factory=QueryBuffer, init=False, repr=False)
    _decoding: dict[int, tuple[nn.Module, object]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_real(self.epsilon, "epsilon", low=0.0, high=1.0, low_open=True, high_open=False)
        check_real(self.saliency_weight, "saliency_weight", low=0.0, high=math.inf, low_open=False, high_open=True)
        check_positive_int(self.window, "window")
        check_positive_int(self.kernel_size, "kernel_size")
        check_positive_int(self.kmeans_iters, "kmeans_iters", minimum=0)
        check_choice(self.salient, "salient", SALIENT)
        check_choice(self.mode, "mode", ("clusters", "spans"))
        check_choice(self.bias, "bias", ("size", "mass"))
        if self.time_period is not None:
            check_positive_int(self.time_period, "time_period")
            if self.mode != "spans":
                raise ValueError(f"time_period merges spans along time: it needs mode='spans', got mode={self.mode!r}")
        check_positive_int(self.time_offset, "time_offset", minimum=0)
        check_choice(self.budget, "budget", ("uniform", "entropy", "replay"))
        check_choice(self.scoring, "scoring", ("window", "replay", "prompt"))
        if self.budget == "replay" and self.scoring != "replay":
            raise ValueError("budget='replay' splits the cache by replay scores: it needs scoring='replay'")
        check_positive_int(self.sinks, "sinks", minimum=0)
        check_positive_int(self.recent, "recent", minimum=0)
        if self.recent and self.scoring != "replay":
            raise ValueError("recent protects trailing entries from replay scoring: it needs scoring='replay' "
                             "(window scoring always keeps its window's entries)")
        check_positive_int(self.replay_pool, "replay_pool")
        if self.replay_pool % 2 == 0:
            raise ValueError(f"replay_pool must be odd (a window centred on each entry), got {self.replay_pool}")
        if self.replay_pool > 1 and self.scoring != "replay":
            raise ValueError(f"replay_pool pools replay scores: it needs scoring='replay', not {self.scoring!r}")
        if self.head_budgets and (self.scoring != "replay" or self.mode != "clusters" or self.kmeans_iters
                                  or self.align or self.bias != "size"):
            raise ValueError(
                "head_budgets=True compares replay scores across heads and merges into the kept entries: it needs "
                "scoring='replay' with mode='clusters', kmeans_iters=0, align=False and bias='size'"
            )
        check_real(self.leverage, "leverage", low=0.0, high=1.0, low_open=False, high_open=False)
        check_real(self.leverage_ridge, "leverage_ridge", low=0.0, high=math.inf, low_open=True, high_open=True)
        check_positive_int(self.leverage_pool, "leverage_pool")
        if self.leverage_pool % 2 == 0:
            raise ValueError(f"leverage_pool must be odd (a window centred on each entry), got {self.leverage_pool}")
        if self.leverage_pool > 1 and not self.leverage:
            raise ValueError(f"leverage_pool pools the leverage reserve: it needs leverage > 0, got {self.leverage}")
        if self.leverage and self.scoring != "replay":
            raise ValueError(f"leverage reserves part of the replay budget: it needs scoring='replay', "
                             f"not {self.scoring!r}")
        self.replay_prefix = tuple(int(i) for i in self.replay_prefix)
        check_real(self.budget_floor, "budget_floor", low=0.0, high=1.0, low_open=False, high_open=False)
        check_real(self.budget_power, "budget_power", low=0.0, high=math.inf, low_open=False, high_open=True)
        check_real(self.align_ridge, "align_ridge", low=0.0, high=math.inf, low_open=True, high_open=True)
        check_real(self.align_floor, "align_floor", low=0.0, high=math.inf, low_open=False, high_open=True)
        check_real(self.novelty, "novelty", low=0.0, high=math.inf, low_open=False, high_open=True)
        check_positive_int(self.decoding_interval, "decoding_interval")
        if self.decoding_size is not None:
            check_positive_int(self.decoding_size, "decoding_size")
            if not self.proportional or self.bias != "size" or self.head_budgets:
                raise ValueError(
                    "decoding_size merges the cache again while decoding, weighting each entry by the tokens it "
                    "stands for: it needs proportional=True with bias='size' (the sizes) and head_budgets=False, got "
                    f"proportional={self.proportional}, bias={self.bias!r}, head_budgets={self.head_budgets}")
        if self.decoding_window is not None:
            check_positive_int(self.decoding_window, "decoding_window")
            if self.decoding_size is None:
                raise ValueError("decoding_window sets the queries that score merges while decoding: it needs "
                                 "decoding_size (merging while decoding), got decoding_size=None")
            if self.decoding_window >= self.decoding_size:
                raise ValueError(
                    f"decoding_window keeps the last decoding_window entries whole at each merge: it must be below "
                    f"decoding_size ({self.decoding_size}), got {self.decoding_window}")

    @property
    def effective_decoding_window(self) -> int:
        """The decoded queries that score each merge while decoding (``decoding_window``, or its default for this
        ``decoding_size``)."""
        if self.decoding_window is not None:
            return self.decoding_window
        return max(1, (self.decoding_size or 0) // DECODING_WINDOW_SHARE)

    def seed_share(self) -> Tensor | None:
        """``[B, L]``: share of (layer, KV head) pairs in which each prompt token seeded a group."""
        return None if self.kept_share is None else self.kept_share / self.layers_merged

    def _new_prompt(self) -> None:
        super()._new_prompt()
        self.kept_share, self.layers_merged, self._windows, self._replayed = None, 0, {}, {}
        self._leverages = {}
        self._drop_decoded_queries()
        self.decoding_merges = 0

    def _release(self) -> None:
        super()._release()
        self._windows, self._replayed, self._leverages = {}, {}, {}
        self._drop_decoded_queries()

    def _drop_decoded_queries(self) -> None:
        """Forget the queries buffered for the next merges: decoding outside the press, or another prompt, would
        leave them out of date."""
        for index, (_, cache) in self._decoding.items():
            if index < len(cache.layers) and is_merged(cache.layers[index]):
                cache.layers[index].decoded_queries = None
        self._decoding = {}
        self._decoded_queries.clear()

    def adds_bias(self) -> bool:
        # Layers of uneven lengths (a non-uniform budget) need the per-layer masks of the bias path
        # even without proportional attention: transformers sizes one mask for all of them.
        return self.proportional or self.budget != "uniform" or self.head_budgets

    def folds_heads(self) -> bool:
        return self.head_budgets

    def bias_reason(self) -> str:
        if self.head_budgets:
            return "which KV head owns each entry of a layer's one cache row: head_budgets=True"
        if self.budget != "uniform":
            return f"each layer's own length: budget={self.budget!r}"
        return super().bias_reason()

    def score(self, module: nn.Module, hidden_states: Tensor, keys: Tensor, values: Tensor, kwargs: dict) -> Tensor:
        """Saliency ``[B, Hkv, L]`` of each cached entry, a quantile rank in (0, 1] per head (a cached latent's one
        row: the mean over the heads that read it, :func:`~quickmerge.text.latent.per_cache_row`)."""
        observes = self.budget == "entropy" or self.align or self.scoring == "window"
        # the keys the attention reads (a cached latent expanded per head); replay scoring reads them in rescore
        read = attended_keys(module, keys, values) if observes or self.scoring == "prompt" else keys
        if observes:
            win = observe(module, hidden_states, read, kwargs, self.window)
            if self.budget == "entropy" or self.align:
                self._windows[module.layer_idx] = win
        if self.scoring == "replay":
            if self.leverage:
                lev = key_leverage(prerope_keys(module, hidden_states), self.leverage_ridge)
                self._leverages[module.layer_idx] = neighbourhood_max(lev, self.leverage_pool)
            return keys  # rated in :meth:`rescore`, once the prompt has been read again
        if self.scoring == "prompt":
            ranks = prompt_saliency(module, hidden_states, read, kwargs, salient=self.salient,
                                    kernel_size=self.kernel_size)
        else:
            ranks = saliency(win, read.shape[1], salient=self.salient, kernel_size=self.kernel_size)
        return self._with_novelty(per_cache_row(module, ranks, keys, values), keys)

    def check_attentions(self, attentions: list[nn.Module]) -> None:
        """Refuse the options that fit or split each head's keys on a latent attention, whose cache (from
        transformers 5.15) holds one compressed latent for all heads, and merging while decoding where a layer
        reads another layer's cache or the cache holds latents."""
        if self.decoding_size is not None and self._kv_sources:
            raise UnsupportedAttentionError(unsupported_message(attentions[-1], (
                f"layers {sorted(self._kv_sources)} read the cache of an earlier layer, which decoding_size does not "
                "merge yet; leave decoding_size=None")))
        options = {"align=True": self.align, "head_budgets=True": self.head_budgets, "leverage > 0": self.leverage,
                   "decoding_size": self.decoding_size is not None}
        chosen = [name for name, on in options.items() if on]
        latent = [attn for attn in attentions if is_latent_attention(attn)]
        if chosen and latent:
            raise UnsupportedAttentionError(unsupported_message(latent[0], (
                f"a multi-head latent attention caches one compressed latent for all its heads, which "
                f"{', '.join(chosen)} cannot work on (they fit or split each head's keys, or merge per KV head while "
                "decoding); leave them off")))

    def _with_novelty(self, ranks: Tensor, keys: Tensor) -> Tensor:
        if self.novelty > 0:
            novel = key_novelty(keys)
            b, h, length = novel.shape
            ranks = ranks + self.novelty * rank01(novel.reshape(b * h, length)).view(b, h, length)
        return ranks

    def defers(self) -> bool:
        return self.budget == "entropy" or self.scoring == "replay"

    def rescore(
        self, base: nn.Module, cache: object, attentions: dict[int, nn.Module], scores: dict[int, Tensor | None],
        prompt: dict[str, Tensor],
    ) -> dict[int, Tensor | None]:
        if self.scoring != "replay":
            return scores
        length = next(iter(scores.values())).shape[2]
        self._replayed = replay_scores(base, cache, attentions, replay_inputs(prompt, self.replay_prefix), length)
        out = {}
        for index, keys in scores.items():
            raw = self._replayed[index]
            top = raw.amax() + 1
            raw[..., : self.sinks] = top  # attention sinks always seed, in every head
            if self.recent:
                raw[..., -self.recent:] = top
            if self.replay_pool > 1:  # in place: the budgets and the selection read these scores again
                raw.copy_(neighbourhood_max(raw, self.replay_pool))
            reserved = int(self.leverage * self.kept(length))
            if reserved:  # after the replay pooling, so a reserved entry does not lift its neighbours' replay scores
                best = top_indices(self._leverages[index], reserved)
                raw.scatter_(-1, best, top.expand_as(best).to(raw.dtype))
            out[index] = self._with_novelty(quantile_rank(raw), keys)
        return out

    def layer_budgets(self, lengths: dict[int, int]) -> dict[int, int]:
        layers = sorted(lengths)
        uniform = [self.kept(lengths[i]) for i in layers]
        if self.budget == "uniform":
            return dict(zip(layers, uniform, strict=True))
        if self.budget == "replay":
            raw = torch.stack([self._replayed[i].float().flatten() for i in layers])  # [layers, B*Hkv*L]
            per_row = raw.shape[1] // lengths[layers[0]]
            threshold = raw.flatten().topk(sum(uniform) * per_row).values[-1]
            weights = (raw >= threshold).sum(dim=1).tolist()
        else:
            weights = [spread(self._windows[i]) ** self.budget_power for i in layers]
        floor = [max(1, int(self.budget_floor * u)) for u in uniform]
        kept = allocate(sum(uniform), weights, [lengths[i] for i in layers], floor)
        return dict(zip(layers, kept, strict=True))

    def merge(self, module: nn.Module, keys: Tensor, values: Tensor, scores: Tensor | None, kept: int) -> Compressed:
        """Merge ``[B, Hkv, L, d]`` keys/values into ``kept`` groups per head (see ``mode``)."""
        b, hkv, length, d = keys.shape
        if self.scoring == "replay":
            self._check_protected(module.layer_idx, length, kept)
        if self.head_budgets:
            return self._merge_flat(module, keys, values, scores, kept)
        flat_k = keys.reshape(b * hkv, length, d)
        flat_v = values.reshape(b * hkv, length, values.shape[-1])
        s = scores.reshape(b * hkv, length)
        top = top_indices(s, kept)
        mask = torch.zeros_like(s).scatter_(1, top, 1.0)
        kept_share = mask.view(b, hkv, length).mean(dim=1)  # [B, L]: share of heads keeping each entry as a seed
        self.kept_share = kept_share if self.kept_share is None else self.kept_share + kept_share
        self.layers_merged += 1
        mass = merge_mass(mask, s, self.epsilon)
        if self.mode == "spans" and self.time_period is not None:
            assignment = spans_along_time(flat_k, s, kept, self.time_period, self.time_offset, self.saliency_weight)
        elif self.mode == "spans":
            assignment = contiguous_spans(flat_k, s, kept, self.saliency_weight)
        elif self.kmeans_iters > 0:
            assignment = cluster_by_similarity(flat_k, mass, top.sort(dim=-1).values, self.kmeans_iters)
        else:
            assignment = assign_to_seeds(flat_k, mask.bool(), top.sort(dim=-1).values)
        merged_k, total = weighted_mean(flat_k, mass, assignment, kept)
        merged_v, _ = weighted_mean(flat_v, mass, assignment, kept)
        if self.align:
            win = self._windows[module.layer_idx]
            counts = group_sum(torch.ones_like(mass)[..., None], assignment, kept)[..., 0]
            queries = win.queries.reshape(b * hkv, -1, d)  # [R, G*w, d]: the query heads that read each KV head
            cap, sinks = logit_cap_and_sinks(module)
            if sinks is not None:  # [H] -> each query's: [R, G*w]
                sinks = sinks.view(1, hkv, -1, 1).expand(b, -1, -1, win.queries.shape[2]).reshape(b * hkv, -1)
            merged_k = fit_keys(flat_k, assignment, merged_k, counts, queries, win.scaling, self.align_ridge,
                                softcap=cap)
            weights = read_weights(flat_k, queries, win.scaling, self.align_floor, softcap=cap, sinks=sinks)
            merged_v = fit_values(flat_v, assignment, kept, weights)
        sizes = None
        if self.proportional and self.bias == "size":
            sizes = group_sum(torch.ones_like(mass)[..., None], assignment, kept)[..., 0]
        elif self.proportional:  # total mass relative to the group's heaviest member
            heaviest = torch.zeros_like(total).scatter_reduce(1, assignment, mass, "amax")
            sizes = total / heaviest
        elif self.budget != "uniform":  # no bias, but this layer's own mask (see adds_bias)
            sizes = torch.ones_like(total)
        return Compressed(
            merged_k.view(b, hkv, kept, d),
            merged_v.view(b, hkv, kept, values.shape[-1]),
            None if sizes is None else sizes.view(b, hkv, kept),
        )

    def decoded(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Buffer the decoded queries of a full-attention layer within ``decoding_window`` entries of its next
        merge."""
        if self.decoding_size is None or sliding_window_of(module) is not None:
            return
        cache = cache_arg(kwargs)
        if cache is None or module.layer_idx >= len(cache.layers):
            return
        layer = cache.layers[module.layer_idx]
        window = self.effective_decoding_window
        if physical_length(layer) + window <= self.decoding_size + self.decoding_interval:
            return  # its next merge is more than a window away
        if not is_merged(layer):  # a layer the prompt left whole becomes a merged one, which carries the queries
            layer = cache.layers[module.layer_idx] = merged_layer(layer, layer.keys, layer.values,
                                                                  layer.get_seq_length())
        self._decoded_queries.add(layer, module, hidden_states_arg(args, kwargs), kwargs, window)
        self._decoding[module.layer_idx] = (module, cache)

    def after_decoding(self) -> None:
        """Merge every layer that decoding filled to ``decoding_size + decoding_interval`` entries back to
        ``decoding_size`` (:func:`~quickmerge.text.decoding.remerge`)."""
        for index, (module, cache) in list(self._decoding.items()):
            layer = cache.layers[index]
            length = physical_length(layer)
            if length < self.decoding_size + self.decoding_interval:
                continue
            hkv = layer.keys.shape[1]
            log_sizes = getattr(layer, "log_sizes", None)
            bias = None if log_sizes is None else F.pad(log_sizes, (0, length - log_sizes.shape[-1]))
            with torch.no_grad():
                keys, values, sizes = remerge(
                    module, layer.keys, layer.values, entry_sizes(log_sizes, hkv, length, layer.keys),
                    layer.decoded_queries, self.decoding_size, log_sizes=bias,
                    epsilon=self.epsilon, salient=self.salient, kernel_size=self.kernel_size)
            merged = merged_layer(layer, keys, values, layer.get_seq_length())
            heads = module.config.num_attention_heads
            merged.log_sizes = sizes.log().repeat_interleave(heads // hkv, dim=1)[:, :, None, :]
            cache.layers[index] = merged
            del self._decoding[index]
            self.decoding_merges += 1

    def _check_protected(self, layer: int, length: int, kept: int) -> None:
        """Refuse a layer budget smaller than the entries replay scoring always keeps (the first ``sinks`` and the
        last ``recent``): it would have to cut some of them."""
        protected = min(length, self.sinks + self.recent)
        if kept < protected:
            raise ValueError(
                f"replay scoring always keeps the first sinks={self.sinks} and the last recent={self.recent} entries "
                f"({protected} of this prompt's {length}), but layer {layer} keeps {kept} per head at "
                f"compression_ratio={self.compression_ratio}" + (f" (budget={self.budget!r}, budget_floor="
                f"{self.budget_floor})" if self.budget != "uniform" else "") + ": lower sinks or recent, or the "
                "compression ratio, or give the prompt more entries")

    def _merge_flat(self, module: nn.Module, keys: Tensor, values: Tensor, ranks: Tensor, kept: int) -> Compressed:
        """``hkv x kept`` entries of the layer's heads together, the best replay scores (flat layout)."""
        hkv = keys.shape[1]
        out = select_and_merge(keys, values, self._replayed[module.layer_idx], ranks, hkv * kept, self.epsilon)
        self.layers_merged += 1
        sizes = out.sizes if self.proportional else torch.ones_like(out.sizes)
        return Compressed(out.keys[:, None], out.values[:, None], sizes[:, None], out.owners)

