"""Input-side QuickMerge++ for Hugging Face causal LMs: fewer tokens after layer l.

``with QuickMergeInputPress(compression_ratio=0.5, layer=2)(model): model.model(ids, past_key_values=cache)``
runs layers 0..l on all N prompt tokens, then merges the hidden states into K = N - int(N * ratio)
contiguous, ordered spans (the core's causal mode), so layers l+1.. run on K tokens and prefill
itself gets faster. A merged token sits at the position of its span's last token; later
tokens keep their true positions. Decoding must stay inside the ``with`` block: the upper
layers' attention masks are rebuilt for their shorter caches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._validation import check_real
from ..merging import contiguous_spans, group_sum, merge_mass
from .hf_causal_lm import QuickMergePress, _base_model, cache_causal_mask, decoder_attention_layers


@dataclass
class QuickMergeInputPress:
    """Merge the prompt's hidden states after decoder layer ``layer`` (order-preserving).

    Args:
        compression_ratio: share of prompt tokens removed, in [0, 1).
        layer: index of the decoder layer after which tokens are merged.
        window, epsilon, saliency_weight, salient: as in :class:`QuickMergePress`; saliency is
            the attention layer ``layer`` pays from its last ``window`` queries, averaged over heads.
    """

    compression_ratio: float = 0.5
    layer: int = 4
    window: int = 16
    epsilon: float = 0.03
    saliency_weight: float = 1.0
    salient: str = "low_entropy"
    original_length: int | None = field(default=None, init=False)
    compressed_length: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        check_real(self.compression_ratio, "compression_ratio", low=0.0, high=1.0, low_open=False, high_open=True)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative integer, got {self.layer!r}")
        self._scorer = QuickMergePress(
            compression_ratio=self.compression_ratio,
            window=self.window,
            epsilon=self.epsilon,
            saliency_weight=self.saliency_weight,
            salient=self.salient,
        )

    @property
    def achieved_ratio(self) -> float | None:
        if not self.original_length:
            return None
        return 1.0 - self.compressed_length / self.original_length

    def _merge_after(self, block: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        hidden_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = kwargs.get("past_key_values")
        cache_position = kwargs.get("cache_position")
        hidden = output[0] if isinstance(output, tuple) else output
        b, n, _ = hidden.shape
        if cache is None or cache_position is None or int(cache_position[-1]) + 1 != n:
            return None  # not a prefill
        kept = max(1, int(n * (1 - self.compression_ratio)))
        self.original_length, self.compressed_length = n, kept
        if kept >= n:
            self._positions = None
            return None
        attn = block.self_attn
        with torch.no_grad():
            normed = block.input_layernorm(hidden_in)
            keys = cache.layers[attn.layer_idx].keys
            saliency = self._scorer.score(attn, normed, keys, kwargs).mean(dim=1)  # [B, N]
            assignment = contiguous_spans(hidden, saliency, kept, self.saliency_weight)
            top = saliency.topk(kept, dim=-1).indices
            mask = torch.zeros_like(saliency).scatter_(1, top, 1.0)
            mass = merge_mass(mask, saliency, self.epsilon)[..., None]
            pos = torch.arange(n, device=hidden.device).expand(b, n)
            last = torch.zeros(b, kept, dtype=torch.long, device=hidden.device).scatter_reduce(
                1, assignment, pos, "amax"
            )
        merged = (group_sum(mass * hidden.float(), assignment, kept) / group_sum(mass, assignment, kept)).to(
            hidden.dtype
        )
        self._positions = last
        return (merged, *output[1:]) if isinstance(output, tuple) else merged

    def _before_upper(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positions = getattr(self, "_positions", None)
        if positions is None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cache = kwargs.get("past_key_values")
        q_len = hidden.shape[1]
        past = cache.get_seq_length(block.self_attn.layer_idx) if cache is not None else 0
        if past == 0 and q_len == positions.shape[1]:
            cos, sin = kwargs["position_embeddings"]  # [1 or B, N, d]
            cos, sin = cos.expand(positions.shape[0], -1, -1), sin.expand(positions.shape[0], -1, -1)
            index = positions[..., None].expand(-1, -1, cos.shape[-1])
            kwargs["position_embeddings"] = (cos.gather(1, index), sin.gather(1, index))
        kwargs["attention_mask"] = cache_causal_mask(past, q_len, hidden.device, hidden.dtype)
        return args, kwargs

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        decoder_attention_layers(model)  # raises on models without decoder layers
        blocks = list(_base_model(model).layers)
        if self.layer >= len(blocks) - 1:
            raise ValueError(f"layer must be below the last decoder layer ({len(blocks) - 1}), got {self.layer}")
        self.original_length = self.compressed_length = None
        self._positions = None
        handles = [blocks[self.layer].register_forward_hook(self._merge_after, with_kwargs=True)]
        for block in blocks[self.layer + 1 :]:
            handles.append(block.register_forward_pre_hook(self._before_upper, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._positions = None
