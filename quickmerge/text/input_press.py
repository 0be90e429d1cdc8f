"""``QuickMergeInputPress``: fewer prompt tokens after decoder layer l, so prefill itself is faster.

``with QuickMergeInputPress(compression_ratio=0.5, layer=2)(model): model.model(ids, past_key_values=cache)``
runs layers 0..l on all N prompt tokens, then merges the hidden states into K = N - int(N * ratio)
contiguous, ordered spans (the core's causal mode), so layers l+1.. run on K tokens. A merged
token sits at the position of its span's last token; later tokens keep their true positions.
Decoding must stay inside the ``with`` block: the upper layers' attention masks are rebuilt
for their shorter caches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_choice, check_positive_int, check_real
from ..merging import contiguous_spans, merge_mass
from ..primitives import weighted_mean
from .decoder import cache_causal_mask, hidden_states_arg, is_prefill
from .press import Press
from .scoring import SALIENT, Salient, window_saliency


@dataclass
class QuickMergeInputPress(Press):
    """Merge the prompt's hidden states after decoder layer ``layer`` (order-preserving).

    Args:
        compression_ratio: share of prompt tokens removed, in [0, 1).
        layer: index of the decoder layer after which tokens are merged.
        window, epsilon, saliency_weight, salient: as in :class:`~quickmerge.QuickMergePress`;
            saliency is the attention layer ``layer`` pays from its last ``window`` queries,
            averaged over heads.
    """

    layer: int = 4
    window: int = 16
    epsilon: float = 0.03
    saliency_weight: float = 1.0
    salient: Salient = "low_entropy"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.layer, "layer", minimum=0)
        check_positive_int(self.window, "window")
        check_real(self.epsilon, "epsilon", low=0.0, high=1.0, low_open=True, high_open=False)
        check_real(self.saliency_weight, "saliency_weight", low=0.0, high=math.inf, low_open=False, high_open=True)
        check_choice(self.salient, "salient", SALIENT)
        self._positions: Tensor | None = None

    def _reset(self) -> None:
        super()._reset()
        self._positions = None

    def _release(self) -> None:
        self._positions = None

    def _hooks(self, model: nn.Module, layers: list[nn.Module]) -> list[Any]:
        if self.layer >= len(layers) - 1:
            raise ValueError(f"layer must be below the last decoder layer ({len(layers) - 1}), got {self.layer}")
        handles = [layers[self.layer].register_forward_hook(self._merge_after, with_kwargs=True)]
        for block in layers[self.layer + 1 :]:
            handles.append(block.register_forward_pre_hook(self._before_upper, with_kwargs=True))
        return handles

    def _merge_after(self, block: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        hidden_in = hidden_states_arg(args, kwargs)
        hidden = output[0] if isinstance(output, tuple) else output
        b, n, _ = hidden.shape
        if not is_prefill(kwargs, n):
            return None
        kept = self.kept(n)
        self._record(n, kept)
        if kept >= n:
            self._positions = None
            return None
        attn = block.self_attn
        with torch.no_grad():
            normed = block.input_layernorm(hidden_in)
            keys = kwargs["past_key_values"].layers[attn.layer_idx].keys
            saliency = window_saliency(attn, normed, keys, kwargs, window=self.window, salient=self.salient)
            saliency = saliency.mean(dim=1)  # [B, N]
            assignment = contiguous_spans(hidden, saliency, kept, self.saliency_weight)
            top = saliency.topk(kept, dim=-1).indices
            mask = torch.zeros_like(saliency).scatter_(1, top, 1.0)
            mass = merge_mass(mask, saliency, self.epsilon)
            pos = torch.arange(n, device=hidden.device).expand(b, n)
            last = torch.zeros(b, kept, dtype=torch.long, device=hidden.device).scatter_reduce(
                1, assignment, pos, "amax"
            )
        merged, _ = weighted_mean(hidden, mass, assignment, kept)
        self._positions = last
        return (merged, *output[1:]) if isinstance(output, tuple) else merged

    def _before_upper(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positions = self._positions
        if positions is None:
            return None
        hidden = hidden_states_arg(args, kwargs)
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
