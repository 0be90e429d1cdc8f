"""Multi-head latent attention (DeepSeek V2/V3, GLM-4.7-Flash, Youtu, Mistral 4, MiniCPM3, Kimi Linear): what the
presses need beyond :mod:`quickmerge.text.decoder`.

Every head's keys and values are expanded (``kv_b_proj``) from one compressed latent per token, beside one rotated
key part the heads share. Up to transformers 5.14 the cache holds the expanded keys and values of each head; from 5.15
it holds the latent ``[B, 1, L, kv_lora_rank]`` and the shared part ``[B, 1, L, qk_rope_head_dim]``, one row for all
heads. The expansion is linear, so a mean of latent rows expands to the mean of every head's keys and values: the
presses merge those rows as they are and score them through the keys they expand to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def is_latent_attention(attention: nn.Module | None) -> bool:
    """Whether an attention module is a multi-head latent attention (DeepSeek V2/V3, GLM-4.7-Flash, Kimi, ...): keys
    and values of every head expanded (``kv_b_proj``) from one compressed latent per token, beside one rotated key
    part shared by the heads (both from ``kv_a_proj_with_mqa``)."""
    return hasattr(attention, "kv_a_proj_with_mqa") and hasattr(attention, "kv_b_proj")


def latent_heads(module: nn.Module, hidden_states: Tensor, part: str) -> Tensor:
    """A latent attention's (:func:`is_latent_attention`) queries or keys ``[B, heads, n, d]`` of ``hidden_states
    [B, n, D]`` before the rotary embedding, as its forward lays them out: each head's part without position
    (``qk_nope_head_dim``), then the part to rotate (``qk_rope_head_dim``), the keys' shared by every head. Queries
    through ``q_proj``, or the low-rank ``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``."""
    b, n, _ = hidden_states.shape
    if part == "q":
        if getattr(module, "q_proj", None) is not None:
            q = module.q_proj(hidden_states)
        else:
            q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden_states)))
        return q.view(b, n, -1, module.qk_nope_head_dim + module.qk_rope_head_dim).transpose(1, 2)
    latent, shared = module.kv_a_proj_with_mqa(hidden_states).split(
        [module.kv_lora_rank, module.qk_rope_head_dim], dim=-1)
    return expanded_keys(module, module.kv_a_layernorm(latent)[:, None], shared[:, None])


def expanded_keys(module: nn.Module, latent: Tensor, shared: Tensor) -> Tensor:
    """Keys ``[B, heads, L, d]`` of a latent attention from its normalised latent ``[B, 1, L, kv_lora_rank]`` and
    its shared key part ``[B, 1, L, qk_rope_head_dim]`` (rotated or not: it passes through), as its forward expands
    them (``kv_b_proj``: each head's key part without position, then its value)."""
    b, _, length, _ = latent.shape
    kv = module.kv_b_proj(latent[:, 0]).view(b, length, -1, module.qk_nope_head_dim + module.v_head_dim)
    nope = kv[..., : module.qk_nope_head_dim].transpose(1, 2)
    return torch.cat((nope, shared.expand(-1, nope.shape[1], -1, -1).to(nope.dtype)), dim=-1)


def caches_latent(module: nn.Module, keys: Tensor, values: Tensor) -> bool:
    """Whether ``keys``/``values`` of a cache layer hold a latent attention's compressed latent ``[B, 1, L,
    kv_lora_rank]`` and rotated shared key part ``[B, 1, L, qk_rope_head_dim]`` (transformers 5.15 and later) rather
    than each head's keys and values (before)."""
    return (is_latent_attention(module) and keys.shape[1] == 1 and keys.shape[-1] == module.kv_lora_rank
            and values.shape[-1] == module.qk_rope_head_dim)


def attended_keys(module: nn.Module, keys: Tensor, values: Tensor) -> Tensor:
    """The post-RoPE keys ``[B, Hkv, L, d]`` the attention reads from a cache layer's ``keys``/``values``: its keys,
    but a latent attention's expanded per head where the layer caches its latent (:func:`caches_latent`)."""
    return expanded_keys(module, keys, values) if caches_latent(module, keys, values) else keys


def per_cache_row(module: nn.Module, scores: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Scores ``[B, H, L]`` of the heads that read a cache layer, as ``[B, rows, L]`` for its ``keys``: a cached
    latent (:func:`caches_latent`) is one row for every head, scored by their mean."""
    return scores.mean(dim=1, keepdim=True) if caches_latent(module, keys, values) else scores
