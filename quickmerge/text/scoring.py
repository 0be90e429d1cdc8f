"""How a press observes a layer: the prompt's last queries and the attention they pay.

The last ``window`` prompt tokens' queries are recomputed from the layer's own projection
(SnapKV's observation window, so fused attention stays usable) and their attention over
the whole prompt is taken. From that :class:`Window`:

- :func:`saliency`: each entry's score, the attention it receives, each query counted by
  how focused it is (QuickMerge++'s entropy saliency);
- :func:`spread`: how many entries the layer's queries effectively attend to (the
  perplexity of their attention), which sets the layer's share of a cache budget.

:func:`prompt_saliency` scores from every prompt query instead of a window (the same
focus weights, ObservedAttention's normalisation by the queries that see each entry).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..primitives import attention_received, normalized_entropy, quantile_rank
from .decoder import attention_scale, key_rotation, logit_cap_and_sinks, window_queries

Salient = Literal["low_entropy", "high_entropy", "uniform"]
SALIENT = ("low_entropy", "high_entropy", "uniform")


@dataclass
class Window:
    """The observation window of one layer.

    Attributes:
        queries: ``[B, H, w, d]`` post-RoPE queries of the last ``w`` prompt tokens (float32).
        probs: ``[B, H, w, L]`` their causal attention over the prompt's ``L`` cached keys.
        scaling: the attention's logit scale.
    """

    queries: Tensor
    probs: Tensor
    scaling: float

    @property
    def size(self) -> int:
        return self.probs.shape[2]


def observe(module: nn.Module, hidden_states: Tensor, keys: Tensor, kwargs: dict, window: int) -> Window:
    """The :class:`Window` of the last ``w = min(window, L)`` prompt tokens over ``keys [B, Hkv, L, d]``.

    Query ``i`` of the window sits at position ``L - w + i`` and sees keys up to it (causal).
    """
    w = min(window, keys.shape[2])
    pe = kwargs.get("position_embeddings")
    q = window_queries(module, hidden_states[:, -w:], kwargs, key_rotation(module, hidden_states, keys, pe))
    return window_of(module, q.float(), keys)


def window_of(module: nn.Module, queries: Tensor, keys: Tensor, bias: Tensor | None = None) -> Window:
    """The :class:`Window` of ``queries [B, H, w, d]`` (float32), those of the tokens of the last ``w`` of the ``L``
    entries of ``keys [B, Hkv, L, d]``: query ``i`` sees the keys up to position ``L - w + i`` (causal), with
    ``bias`` (``[B, H, 1, L]``, e.g. proportional attention's ``log(size)``) on its logits if given."""
    length, hkv, w = keys.shape[2], keys.shape[1], queries.shape[2]
    groups = queries.shape[1] // hkv
    k = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
    scale = attention_scale(module)
    logits = torch.matmul(queries, k.float().transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias.float()
    q_pos = torch.arange(length - w, length, device=keys.device)
    allowed = torch.arange(length, device=keys.device)[None, :] <= q_pos[:, None]
    return Window(queries, attention_probs(module, logits, allowed), scale)


def soft_capped(logits: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(logits / cap)`` (Gemma 2's ``attn_logit_softcapping``), a new tensor; ``logits`` if no cap."""
    return torch.tanh(logits / cap).mul_(cap) if cap else logits


def softmax_with_sinks(logits: Tensor, sinks: Tensor | None) -> Tensor:
    """Softmax over the last axis of ``logits [..., L]`` that each row shares with its sink logit (``sinks``
    broadcastable to ``[..., 1]``, gpt-oss's), or a plain softmax if None."""
    if sinks is None:
        return logits.softmax(dim=-1)
    sink = sinks.float().expand(*logits.shape[:-1], 1)
    return torch.cat([logits, sink], dim=-1).softmax(dim=-1)[..., :-1]


def attention_probs(module: nn.Module, logits: Tensor, allowed: Tensor) -> Tensor:
    """Attention ``[B, H, q, L]`` from scaled ``logits`` as ``module`` turns them into weights: capped by its
    ``attn_logit_softcapping`` (Gemma 2) and sharing the softmax with its per-head ``sinks`` (gpt-oss),
    only the ``allowed [q, L]`` entries seen."""
    cap, sinks = logit_cap_and_sinks(module)
    logits = soft_capped(logits, cap).masked_fill(~allowed, float("-inf"))
    return softmax_with_sinks(logits, None if sinks is None else sinks.view(1, -1, 1, 1))


def window_attention(module: nn.Module, hidden_states: Tensor, keys: Tensor, kwargs: dict, window: int) -> Tensor:
    """Attention ``[B, H, w, L]`` (float32) of the last ``w = min(window, L)`` prompt tokens."""
    return observe(module, hidden_states, keys, kwargs, window).probs


def query_weights(probs: Tensor, salient: Salient, support: Tensor | None = None) -> Tensor:
    """Weight ``[B, H, w]`` of each query: its focus (``low_entropy``), breadth, or 1.

    ``support [w]``: keys each query may see (default: the prompt's last ``w`` queries, ``L - w + 1 .. L``).
    """
    b, h, w, length = probs.shape
    if salient == "uniform":
        return torch.ones(b, h, w, device=probs.device)
    if support is None:
        support = torch.arange(length - w, length, device=probs.device) + 1
    entropy = normalized_entropy(probs, support)
    return 1.0 - entropy if salient == "low_entropy" else entropy


def neighbourhood_max(scores: Tensor, width: int) -> Tensor:
    """``[B, H, L]`` -> ``[B, H, L]``: each entry's score replaced by the largest within ``width`` (odd)
    positions centred on it, so the neighbours of a salient entry rank with it."""
    b, h, length = scores.shape
    pooled = F.max_pool1d(scores.reshape(b * h, 1, length), width, stride=1, padding=width // 2)
    return pooled.view(b, h, length)


def saliency(win: Window, hkv: int, *, salient: Salient = "low_entropy", kernel_size: int = 5) -> Tensor:
    """Saliency ``[B, Hkv, L]`` of each cached entry: its quantile rank in (0, 1] per KV head.

    The attention each entry receives from the window (queries weighted by ``salient``),
    spread to its neighbours by an average pool of width ``kernel_size``, averaged over the
    query heads of each KV head. The window's own entries rank highest (they are kept).
    """
    probs = win.probs
    b, _, w, length = probs.shape
    received = attention_received(probs, query_weights(probs, salient))  # [B, H, L]
    if kernel_size > 1:  # neighbours of salient tokens carry their local context
        pad = kernel_size // 2
        received = F.avg_pool1d(received, kernel_size, stride=1, padding=pad, count_include_pad=False)
    received = received.view(b, hkv, -1, length).mean(dim=2)
    # the window itself ranks first, in the order of the attention it receives: if the budget cannot keep all of it
    # (a one-frame window of a video), the entries it keeps are its most attended, not a tie order's choice
    received[..., length - w :] += received.amax(dim=-1, keepdim=True) + 1
    # Attention mass is heavy-tailed; the quantile rank in (0, 1] keeps seeds well above epsilon.
    return quantile_rank(received)


def prompt_saliency(
    module: nn.Module, hidden_states: Tensor, keys: Tensor, kwargs: dict, *, salient: Salient = "low_entropy",
    kernel_size: int = 1, chunk: int = 256,
) -> Tensor:
    """Saliency ``[B, Hkv, L]`` from every prompt query, not a window: a quantile rank in (0, 1] per KV head.

    Each entry's score is the attention it receives from the queries after it (causal),
    weighted by ``salient`` as in :func:`saliency`, divided by the total weight of the
    queries that can see it, so an early entry does not win for having more observers
    (ObservedAttention's normalisation). Queries are taken ``chunk`` at a time: memory
    ``chunk x L`` per head.
    """
    b, hkv, length, _ = keys.shape
    rotation = key_rotation(module, hidden_states, keys, kwargs.get("position_embeddings"))
    q = window_queries(module, hidden_states, kwargs, rotation).float()  # [B, H, L, d]
    groups = q.shape[1] // hkv
    k = keys.float().repeat_interleave(groups, dim=1) if groups > 1 else keys.float()
    key_pos = torch.arange(length, device=keys.device)
    received = torch.zeros(b, q.shape[1], length, device=keys.device)
    observers = torch.zeros_like(received)
    for start in range(0, length, chunk):
        pos = torch.arange(start, min(start + chunk, length), device=keys.device)
        allowed = key_pos[None, :] <= pos[:, None]  # [c, L]
        logits = torch.matmul(q[:, :, pos], k.transpose(-1, -2)) * attention_scale(module)
        probs = attention_probs(module, logits, allowed)  # [B, H, c, L]
        weight = query_weights(probs, salient, pos + 1)
        received += attention_received(probs, weight)
        observers += torch.matmul(weight, allowed.float())  # [B, H, L]: weight of the queries seeing each entry
    received = received / observers.clamp_min(1e-12)
    if kernel_size > 1:
        received = F.avg_pool1d(received, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=False)
    received = received.view(b, hkv, groups, length).mean(dim=2)
    return quantile_rank(received)


def spread(win: Window) -> float:
    """Entries the window's queries effectively attend to: ``exp(entropy)`` of each query's
    attention, averaged over queries, heads and the batch."""
    entropy = -torch.special.xlogy(win.probs, win.probs).sum(dim=-1)  # [B, H, w], nats
    return float(entropy.exp().mean())


def window_saliency(
    module: nn.Module,
    hidden_states: Tensor,
    keys: Tensor,
    kwargs: dict,
    *,
    window: int,
    salient: Salient = "low_entropy",
    kernel_size: int = 5,
) -> Tensor:
    """:func:`saliency` of the window :func:`observe` sees: ``[B, Hkv, L]``."""
    win = observe(module, hidden_states, keys, kwargs, window)
    return saliency(win, keys.shape[1], salient=salient, kernel_size=kernel_size)


def key_novelty(keys: Tensor, chunk: int = 512) -> Tensor:
    """``1 - max_j cos(k_i, k_j)`` over the other entries of the same head, ``[B, Hkv, L]`` in [0, 2].

    High for an entry unlike every other one (a fact stated once), low for one with a near
    copy. Computed in row chunks of ``chunk`` (memory ``chunk x L`` per head), float32.
    """
    unit = F.normalize(keys.float(), dim=-1)
    length = unit.shape[-2]
    out = []
    for start in range(0, length, chunk):
        sim = torch.matmul(unit[..., start : start + chunk, :], unit.transpose(-1, -2))  # [B, H, c, L]
        rows = torch.arange(start, min(start + chunk, length), device=keys.device)
        sim[..., torch.arange(len(rows), device=keys.device), rows] = -2.0  # not its own copy
        out.append(1.0 - sim.amax(dim=-1))
    return torch.cat(out, dim=-1)


def key_leverage(keys: Tensor, ridge: float = 1.0) -> Tensor:
    """Ridge leverage ``[B, Hkv, L]`` of each key among its head's keys, in [0, 1).

    ``x_i^T (X^T X + lambda I)^{-1} x_i`` for the sequence-centred keys ``X [L, d]`` of each head,
    ``lambda = ridge x trace(X^T X) / d`` (the mean eigenvalue times ``ridge``), so directions the
    prompt barely uses do not turn noise into outliers. High for a key far from the bulk of the
    prompt along the directions it does use (a number in prose), as kvpress's LeverageScorePress
    (Compactor) scores with a random sketch; deterministic here. ``keys``: pre-RoPE (position-free).
    """
    x = keys.float() - keys.float().mean(dim=-2, keepdim=True)
    d = x.shape[-1]
    gram = x.transpose(-1, -2) @ x  # [B, H, d, d]
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).sum(-1) / d  # [B, H]
    eye = torch.eye(d, device=keys.device)
    chol = torch.linalg.cholesky(gram + (lam.clamp_min(1e-12))[..., None, None] * eye)
    solved = torch.cholesky_solve(x.transpose(-1, -2), chol)  # [B, H, d, L]
    return (x * solved.transpose(-1, -2)).sum(dim=-1)
