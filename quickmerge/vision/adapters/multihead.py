"""Blocks whose attention is a batch-first ``torch.nn.MultiheadAttention`` (OpenCLIP, torchvision).

``nn.MultiheadAttention`` projects queries, keys and values inside its own forward and returns none of
them, so the attention's pre-hook projects its input once more with the module's own ``in_proj``
weights, only as far as the pass reads (:meth:`~.protocol.BlockMerger.attention_reads`), per token:

- ``"all"`` (a calibration, saliency from many queries): queries and keys, ``2 C^2``;
- ``"class_query"`` (QuickMerge++ comparing keys): keys, ``C^2``, and the class token's query;
- ``"class_logits"`` (QuickMerge++'s default, comparing the residual stream): only the class token's logits,
  ``q_h . (W_h x + b_h) = (W_h^T q_h) . x + q_h . b_h``: the class query folded into the key weights once per
  image, then ``H C`` per token; handed on as queries ``[B, H, 1, C]`` and keys ``x [B, 1, N, C]``, whose
  product lacks only ``q_h . b_h``, a constant per head, which no softmax sees;
- ``"mean_keys"`` (ToMe-style): keys averaged over heads, from the mean of the heads' weights, ``C hd``;
- ``"none"`` (random, pool): nothing.

It passes log(size) as a float ``key_padding_mask [B, N]`` (proportional attention). The module is
self-attention in both families: its query input is also its keys' and values' input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .protocol import BlockMerger


def is_plain_multihead(attn: Any) -> bool:
    """Whether ``attn`` is a batch-first ``nn.MultiheadAttention`` with one packed, biased input projection."""
    return (isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
            and attn.in_proj_bias is not None)


def project(attn: nn.MultiheadAttention, x: Tensor, reads: str) -> tuple[Tensor | None, Tensor | None]:
    """Queries and keys of ``attn`` for its input ``x [B, N, C]``, as far as ``reads`` asks (module docstring):
    ``[B, H, N or 1, hd]`` each, or the folded forms of ``"class_logits"`` / ``"mean_keys"``, or None."""
    heads, width = attn.num_heads, attn.embed_dim
    head_dim = width // heads
    b, n, _ = x.shape
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if reads == "all":
        qk = F.linear(x, weight[: 2 * width], bias[: 2 * width])
        q, k = qk.view(b, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # each [B, H, N, hd]
        return q, k
    if reads == "none":
        return None, None
    w_k, b_k = weight[width : 2 * width].view(heads, head_dim, width), bias[width : 2 * width].view(heads, head_dim)
    if reads == "mean_keys":
        return None, F.linear(x, w_k.mean(dim=0), b_k.mean(dim=0))[:, None]  # [B, 1, N, hd]
    q_cls = F.linear(x[:, :1], weight[:width], bias[:width]).view(b, 1, heads, head_dim).transpose(1, 2)
    if reads == "class_query":
        return q_cls, F.linear(x, weight[width : 2 * width], bias[width : 2 * width]).view(
            b, n, heads, head_dim).transpose(1, 2)
    if reads == "class_logits":
        folded = torch.einsum("bhd,hdc->bhc", q_cls[:, :, 0], w_k)  # [B, H, C]: W_h^T q_h
        return folded[:, :, None], x[:, None]
    raise ValueError(f"reads must be one of 'all', 'class_query', 'class_logits', 'mean_keys', 'none', got {reads!r}")


def multihead_attention_hook(attn: nn.MultiheadAttention, merger: BlockMerger, owner: str) -> Any:
    """Forward pre-hook (``with_kwargs=True``) for ``attn``: records what the merger reads of its queries and keys
    and adds the merger's attention bias; ``owner`` names the model in the refusal of a mask it passes itself."""
    heads = attn.num_heads
    scale = (attn.embed_dim // heads) ** -0.5

    def attention_pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if not merger.needs_qk():
            return None  # r = 0: the model runs as unpatched, without the projection below
        x = args[0] if args else kwargs["query"]  # [B, N, C]: the normed stream, also the keys' and values' input
        q, k = project(attn, x, merger.attention_reads())
        merger.record_qk(q=q, k=k, scale=scale)
        bias = merger.attention_bias(x)  # [B, 1, 1, N] or None
        if bias is None:
            return None
        if kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None or len(args) > 3:
            raise ValueError(f"quickmerge's proportional attention cannot be combined with a mask the {owner} passes")
        return args, {**kwargs, **mask_arguments(bias.to(x.dtype), heads, x.shape[1])}

    return attention_pre


def mask_arguments(bias: Tensor, heads: int, n: int) -> dict[str, Tensor]:
    """The keyword arguments through which ``nn.MultiheadAttention`` adds ``bias [B, 1, 1, N]`` to its logits: a
    float ``key_padding_mask [B, N]``, which it broadcasts over heads and queries. An ``attn_mask`` would be a
    ``[B * heads, N, N]`` copy per block (477 MB for ViT-B at batch 256). With the key padding mask, forwards were
    4-16% faster on the reference ViT at batch 256 and 2-6% slower, within the rounds' spread, on ViT-B at batch 8
    (BENCHMARKS.md, stop 77)."""
    return {"key_padding_mask": bias[:, 0, 0]}
