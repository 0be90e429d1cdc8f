"""Bidirectional autoregressive prior over the merged sequence: L_AR = L_forward + L_backward.

A lightweight causal transformer predicts merged token t+1 from tokens <= t
(forward) and its mirror, run on the reversed sequence, predicts token t-1 from
tokens >= t (backward). Each direction is one batched causal pass (fused SDPA
with ``is_causal=True``); there is no loop over time steps. No positional
encoding is needed: causal attention makes position recoverable.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_positive_int, check_tokens


class _CausalBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: Tensor) -> Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.out(a.transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.norm2(h))


class CausalPrior(nn.Module):
    """A small causal transformer mapping ``[B, T, D]`` tokens to ``[B, T, D]`` next-token predictions.

    Output t is computed from inputs ``<= t`` only. It predicts a residual on top
    of input t, with a zero-initialised head, so an untrained prior starts from
    "the next token equals this one" rather than from random outputs. Also usable as a stand-in
    autoregressive model for :func:`quickmerge.quickmerge_inference`.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int = 64, num_layers: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        check_positive_int(embedding_dim, "embedding_dim")
        check_positive_int(hidden_dim, "hidden_dim")
        check_positive_int(num_layers, "num_layers")
        check_positive_int(num_heads, "num_heads")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim must be divisible by num_heads, got {hidden_dim} and {num_heads}")
        self.embedding_dim = embedding_dim
        self.inp = nn.Linear(embedding_dim, hidden_dim)
        self.blocks = nn.ModuleList(_CausalBlock(hidden_dim, num_heads, 2) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Linear(hidden_dim, embedding_dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: Tensor, *, validate: bool = True) -> Tensor:
        """Prediction ``[B, K, D]`` for each position of ``tokens [B, K, D]`` from tokens up to it
        (``validate=False``: the caller checked ``tokens``)."""
        if validate:
            check_tokens(tokens, "tokens", dim=self.embedding_dim)
        dtype = self.inp.weight.dtype
        h = self.inp(tokens.to(dtype))
        for block in self.blocks:
            h = block(h)
        return (tokens.to(dtype) + self.head(self.norm(h))).to(tokens.dtype)


def prediction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per token, relative to the targets' mean squared norm (scale-free)."""
    scale = target.detach().float().pow(2).sum(-1).mean().clamp_min(1e-12)
    return (pred.float() - target.float()).pow(2).sum(-1).mean() / scale


class BidirectionalARAlignment(nn.Module):
    """L_AR = L_forward + L_backward on a merged sequence ``[B, K, D]``.

    Args:
        embedding_dim: D.
        hidden_dim, num_layers, num_heads: size of each causal prior.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int = 64, num_layers: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        self.embedding_dim = check_positive_int(embedding_dim, "embedding_dim")
        self.forward_prior = CausalPrior(embedding_dim, hidden_dim, num_layers, num_heads)
        self.backward_prior = CausalPrior(embedding_dim, hidden_dim, num_layers, num_heads)

    def directional_losses(self, merged_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``(L_forward, L_backward)``, scalar tensors that carry gradients."""
        check_tokens(merged_tokens, "merged_tokens", dim=self.embedding_dim)
        return self.losses(merged_tokens)

    def losses(self, merged_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`directional_losses` without checking ``merged_tokens`` (for callers that checked it)."""
        fwd_pred = self.forward_prior(merged_tokens, validate=False)
        bwd_pred = self.backward_prior(merged_tokens.flip(1), validate=False).flip(1)
        if merged_tokens.shape[1] < 2:
            # Nothing to predict; zero losses that stay attached to the graph.
            zero = (fwd_pred.float().sum() + bwd_pred.float().sum()) * 0.0
            return zero, zero.clone()
        l_fwd = prediction_loss(fwd_pred[:, :-1], merged_tokens[:, 1:])
        l_bwd = prediction_loss(bwd_pred[:, 1:], merged_tokens[:, :-1])
        return l_fwd, l_bwd

    def compute_alignment_loss(self, merged_tokens: Tensor) -> Tensor:
        """L_AR = L_forward + L_backward for ``merged_tokens`` ``[B, K, D]``; scalar tensor."""
        l_fwd, l_bwd = self.directional_losses(merged_tokens)
        return l_fwd + l_bwd

    forward = compute_alignment_loss
