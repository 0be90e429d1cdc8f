"""QuickMerge++ KV-cache merging for Hugging Face causal LMs (transformers 5.x).

``QuickMergePress`` is used like a kvpress press::

    with QuickMergePress(compression_ratio=0.5)(model):
        model(context_ids, past_key_values=cache)            # prefill: the cache is merged
    model(next_ids, past_key_values=cache, position_ids=...)  # decode on the merged cache

(decoding inside the ``with`` block also works and then needs no position ids).

During prefill, a forward hook on each attention layer (registered per call and removed
afterwards) recomputes the attention of the last ``window`` queries against all keys from
the layer's own projections, so SDPA stays usable; scores each key by the attention it
receives from that window, each query weighted by how focused it is (1 - normalised
entropy, the QuickMerge++ saliency); and, per KV head, lets the top-scored entries seed
groups that every other entry joins by cosine similarity of keys (the cache has no order
to keep; ``mode="spans"`` merges contiguous spans instead), one merged entry per group
with the mass-weighted mean of its keys and values. Every merged entry remembers its group size; while the press
is active a forward pre-hook adds ``log(size)`` to its attention logits (proportional
attention) through the additive attention mask, and positions of new tokens continue from
the original length.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check_real
from ..merging import cluster_by_similarity, contiguous_spans, group_sum, merge_mass

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
)


def decoder_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a causal LM's decoder layers; raises if there are none."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    layers = getattr(base, "layers", None)
    attns = [getattr(layer, "self_attn", None) for layer in (layers or [])]
    if not attns or any(a is None or not hasattr(a, "k_proj") for a in attns):
        raise TypeError(
            f"{type(model).__name__} has no decoder layers with q/k/v-projected self-attention to patch; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return attns


def cache_causal_mask(past: int, q_len: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[1, 1, q, past + q]``: every cached entry visible, new tokens causal among themselves."""
    kv_len = past + q_len
    allowed = torch.arange(kv_len, device=device)[None, :] <= (past + torch.arange(q_len, device=device))[:, None]
    return torch.zeros(q_len, kv_len, device=device).masked_fill(~allowed, float("-inf")).to(dtype)[None, None]


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    return getattr(base, "language_model", base)


def window_queries(module: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """Post-RoPE queries ``[B, H, w, d]`` of the given hidden states, from the layer's own projection."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, w, _ = hidden_states.shape
    q = module.q_proj(hidden_states).view(b, w, -1, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    cos, sin = position_embeddings
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -w:], sin[:, -w:])
    return q


@dataclass
class QuickMergePress:
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
        kmeans_iters: centre updates after the seed assignment (clusters mode; 0 = pure seeding).
        bias: what proportional attention counts: ``"size"`` (members) or ``"mass"`` (total merge
            mass relative to the heaviest member).
        kernel_size: width of the average pooling that spreads each score to its neighbours.
    After a prefill, ``original_length``, ``compressed_length`` and ``achieved_ratio`` report
    what was done, and ``seed_share()`` how often each prompt token was kept as a seed.
    """

    compression_ratio: float = 0.5
    window: int = 16
    salient: Literal["low_entropy", "high_entropy", "uniform"] = "low_entropy"
    epsilon: float = 0.03
    saliency_weight: float = 1.0
    proportional: bool = True
    mode: Literal["clusters", "spans"] = "clusters"
    kmeans_iters: int = 0
    bias: Literal["size", "mass"] = "size"
    kernel_size: int = 5
    original_length: int | None = field(default=None, init=False)
    compressed_length: int | None = field(default=None, init=False)
    kept_share: Tensor | None = field(default=None, init=False, repr=False)
    layers_merged: int = field(default=0, init=False, repr=False)
    _decoded: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        check_real(self.compression_ratio, "compression_ratio", low=0.0, high=1.0, low_open=False, high_open=True)
        check_real(self.epsilon, "epsilon", low=0.0, high=1.0, low_open=True, high_open=False)
        check_real(self.saliency_weight, "saliency_weight", low=0.0, high=math.inf, low_open=False, high_open=True)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if self.salient not in ("low_entropy", "high_entropy", "uniform"):
            raise ValueError(f"salient must be 'low_entropy', 'high_entropy' or 'uniform', got {self.salient!r}")
        if self.mode not in ("clusters", "spans"):
            raise ValueError(f"mode must be 'clusters' or 'spans', got {self.mode!r}")
        if self.bias not in ("size", "mass"):
            raise ValueError(f"bias must be 'size' or 'mass', got {self.bias!r}")
        for name in ("kernel_size", "kmeans_iters"):
            value, low = getattr(self, name), 1 if name == "kernel_size" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    @property
    def achieved_ratio(self) -> float | None:
        """Share of entries actually removed by the last prefill (None before any)."""
        if not self.original_length:
            return None
        return 1.0 - self.compressed_length / self.original_length

    def seed_share(self) -> Tensor | None:
        """``[B, L]``: share of (layer, KV head) pairs in which each prompt token seeded a group."""
        return None if self.kept_share is None else self.kept_share / self.layers_merged

    # ---- scoring and merging -------------------------------------------------------------
    def score(self, module: nn.Module, hidden_states: Tensor, keys: Tensor, kwargs: dict) -> Tensor:
        """Saliency ``[B, Hkv, L]`` of each cached entry, in [0, 1] per head."""
        b, hkv, length, _ = keys.shape
        w = min(self.window, length)
        q = window_queries(module, hidden_states[:, -w:], kwargs["position_embeddings"])
        h = q.shape[1]
        groups = h // hkv
        k = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
        logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * module.scaling
        q_pos = torch.arange(length - w, length, device=keys.device)
        allowed = torch.arange(length, device=keys.device)[None, :] <= q_pos[:, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(dim=-1)  # [B, H, w, L]
        if self.salient == "uniform":
            weight = torch.ones(b, h, w, device=keys.device)
        else:
            ent = -torch.special.xlogy(probs, probs).sum(-1) / (q_pos + 1).clamp_min(2).log()
            weight = 1.0 - ent if self.salient == "low_entropy" else ent
        received = (weight[..., None] * probs).sum(dim=2)  # [B, H, L]
        if self.kernel_size > 1:  # neighbours of salient tokens carry their local context
            pad = self.kernel_size // 2
            received = F.avg_pool1d(received, self.kernel_size, stride=1, padding=pad, count_include_pad=False)
        received = received.view(b, hkv, groups, length).mean(dim=2)
        received[..., length - w :] = received.amax(dim=-1, keepdim=True) + 1  # the window itself is kept
        # Attention mass is heavy-tailed; the quantile rank in (0, 1] keeps seeds well above epsilon.
        ranks = received.argsort(dim=-1).argsort(dim=-1)
        return (ranks + 1).float() / length

    def merge(self, keys: Tensor, values: Tensor, saliency: Tensor, kept: int) -> tuple[Tensor, Tensor, Tensor]:
        """Merge ``[B, Hkv, L, d]`` keys/values into ``kept`` groups per head (see ``mode``).

        Returns merged keys, values ``[B, Hkv, kept, d]`` and group sizes ``[B, Hkv, kept]``
        (or relative masses, with ``bias="mass"``).
        """
        b, hkv, length, d = keys.shape
        flat_k = keys.reshape(b * hkv, length, d)
        flat_v = values.reshape(b * hkv, length, values.shape[-1])
        s = saliency.reshape(b * hkv, length)
        top = s.topk(kept, dim=-1).indices
        mask = torch.zeros_like(s).scatter_(1, top, 1.0)
        kept_share = mask.view(b, hkv, length).mean(dim=1)  # [B, L]: share of heads keeping each entry as a seed
        self.kept_share = kept_share if self.kept_share is None else self.kept_share + kept_share
        self.layers_merged += 1
        mass = merge_mass(mask, s, self.epsilon)[..., None]
        if self.mode == "spans":
            assignment = contiguous_spans(flat_k, s, kept, self.saliency_weight)
        elif self.kmeans_iters > 0:
            assignment = cluster_by_similarity(flat_k, mass[..., 0], top.sort(dim=-1).values, self.kmeans_iters)
        else:
            assignment = self._assign_to_seeds(flat_k, mask.bool(), top.sort(dim=-1).values)
        total = group_sum(mass, assignment, kept)
        merged_k = (group_sum(mass * flat_k.float(), assignment, kept) / total).to(keys.dtype)
        merged_v = (group_sum(mass * flat_v.float(), assignment, kept) / total).to(values.dtype)
        if self.bias == "size":
            sizes = group_sum(torch.ones_like(mass), assignment, kept)[..., 0]
        else:  # total mass relative to the group's heaviest member
            heaviest = torch.zeros_like(total[..., 0]).scatter_reduce(1, assignment, mass[..., 0], "amax")
            sizes = total[..., 0] / heaviest
        return (
            merged_k.view(b, hkv, kept, d),
            merged_v.view(b, hkv, kept, values.shape[-1]),
            sizes.view(b, hkv, kept),
        )

    @staticmethod
    def _assign_to_seeds(keys: Tensor, is_seed: Tensor, seeds: Tensor) -> Tensor:
        """Group ``[R, L]`` of each entry: seeds their own, the others their most cosine-similar seed.

        Only the L - K non-seed rows are compared with the K seeds (half the work of a full assignment).
        """
        rows, length, d = keys.shape
        kept = seeds.shape[1]
        unit = F.normalize(keys.float(), dim=-1)
        others = (~is_seed).nonzero()[:, 1].view(rows, length - kept)
        centres = unit.gather(1, seeds[..., None].expand(-1, -1, d))
        nearest = torch.matmul(unit.gather(1, others[..., None].expand(-1, -1, d)), centres.transpose(1, 2)).argmax(-1)
        assignment = torch.empty(rows, length, dtype=torch.long, device=keys.device)
        assignment.scatter_(1, seeds, torch.arange(kept, device=keys.device).expand(rows, kept))
        return assignment.scatter_(1, others, nearest)

    # ---- hooks ---------------------------------------------------------------------------
    def _after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = kwargs.get("past_key_values")
        q_len = hidden_states.shape[1]
        cache_position = kwargs.get("cache_position")
        if cache is None or cache_position is None or int(cache_position[-1]) + 1 != q_len:
            return output  # not a prefill: leave the cache alone
        if getattr(module, "is_sliding", False):
            return output  # sliding-window layers (Gemma 3) already bound their cache
        layer = cache.layers[module.layer_idx]
        keys, values = layer.keys, layer.values
        length = keys.shape[2]
        kept = max(1, int(length * (1 - self.compression_ratio)))
        if kept >= length:
            module._quickmerge_bias = None
            self._record(length, length)
            return output
        with torch.no_grad():
            saliency = self.score(module, hidden_states, keys, kwargs)
            layer.keys, layer.values, sizes = self.merge(keys, values, saliency, kept)
        heads = module.config.num_attention_heads
        log_sizes = sizes.log().float() if self.proportional else torch.zeros_like(sizes, dtype=torch.float32)
        # The mask is rebuilt for this layer's shorter cache even without proportional attention.
        module._quickmerge_bias = log_sizes.repeat_interleave(heads // sizes.shape[1], dim=1)[:, :, None, :]
        self._record(length, kept)
        return output

    def _record(self, original: int, compressed: int) -> None:
        self.original_length, self.compressed_length = original, compressed

    def _before_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = getattr(module, "_quickmerge_bias", None)  # [B, H, 1, K]: log sizes of the merged entries
        cache = kwargs.get("past_key_values")
        if bias is None or cache is None:
            return None
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        q_len = hidden_states.shape[1]
        if q_len == 1 and not self.proportional and kwargs.get("attention_mask") is None:
            return None  # one new token sees the whole cache: keep SDPA's mask-free path
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
                "QuickMergePress supports batches of equal-length, unpadded sequences only; "
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

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        """Patch ``model`` (this instance only) for the duration of the ``with`` block."""
        attns = decoder_attention_layers(model)
        if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
            import warnings

            warnings.warn(
                f"QuickMergePress is untested on {type(model).__name__}; tested: {', '.join(SUPPORTED_ARCHITECTURES)}",
                stacklevel=3,
            )
        self.original_length = self.compressed_length = None
        self.kept_share, self.layers_merged, self._decoded = None, 0, 0
        handles = [_base_model(model).register_forward_pre_hook(self._before_model, with_kwargs=True)]
        for attn in attns:
            handles.append(attn.register_forward_hook(self._after_attention, with_kwargs=True))
            handles.append(attn.register_forward_pre_hook(self._before_attention, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for attn in attns:
                attn.__dict__.pop("_quickmerge_bias", None)
