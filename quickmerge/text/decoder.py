"""What the presses need to know about a Hugging Face causal LM's decoder (transformers 5.x).

The decoder layers and their self-attention modules, the arguments the attention receives,
the additive mask for new tokens after a compressed cache, and the post-RoPE queries of a
window of hidden states recomputed from the layer's own projection.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "Phi3ForCausalLM",
    "SmolLM3ForCausalLM",
    "Gemma3ForCausalLM",
    "Gemma3ForConditionalGeneration",
)


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model``, or its ``language_model``)."""
    base = getattr(model, "model", model)
    return getattr(base, "language_model", base)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM; raises TypeError if it has none with q/k/v-projected attention
    (separate ``q_proj``/``k_proj``/``v_proj``, or Phi-3's fused ``qkv_proj``)."""
    layers = list(getattr(base_model(model), "layers", None) or [])
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    if not attns or any(a is None or not (hasattr(a, "k_proj") or hasattr(a, "qkv_proj")) for a in attns):
        raise TypeError(
            f"{type(model).__name__} has no decoder layers with q/k/v-projected self-attention to patch; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return layers


def decoder_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a causal LM's decoder layers; raises if there are none."""
    return [layer.self_attn for layer in decoder_layers(model)]


def warn_if_untested(model: nn.Module, who: str) -> None:
    """Warn once per call when ``model``'s class is not among the tested architectures."""
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        warnings.warn(
            f"{who} is untested on {type(model).__name__}; tested: {', '.join(SUPPORTED_ARCHITECTURES)}",
            stacklevel=4,
        )


def hidden_states_arg(args: tuple, kwargs: dict) -> Tensor:
    """The ``hidden_states`` a decoder layer or attention module was called with."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def sliding_window_of(attention: nn.Module) -> int | None:
    """The sliding window of a decoder attention module, or None for full attention.

    Qwen2/Qwen3/Gemma 3 set ``sliding_window`` per layer on the module; Mistral applies
    ``config.sliding_window`` to every layer.
    """
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window or None
    return getattr(getattr(attention, "config", None), "sliding_window", None) or None


def cache_causal_mask(past: int, q_len: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[1, 1, q, past + q]``: every cached entry visible, new tokens causal among themselves."""
    kv_len = past + q_len
    allowed = torch.arange(kv_len, device=device)[None, :] <= (past + torch.arange(q_len, device=device))[:, None]
    return torch.zeros(q_len, kv_len, device=device).masked_fill(~allowed, float("-inf")).to(dtype)[None, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of ``x [B, H, n, d]`` with ``cos``/``sin`` ``[1 or B, n, r]``
    (the rotate-half convention of Llama, Qwen, Mistral, Phi-3 and Gemma). Only the first ``r``
    channels rotate: ``r < d`` where the model rotates part of each head (Phi-4-mini's
    ``partial_rotary_factor``); the rest pass unchanged, as in Phi-3's own code."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    return torch.cat((x_rot * cos.unsqueeze(1) + rotated * sin.unsqueeze(1), x_pass), dim=-1)


def projection(module: nn.Module, hidden_states: Tensor, part: str) -> Tensor:
    """The ``part`` (``"q"`` or ``"k"``) projection ``[B, n, heads * d]`` of ``hidden_states [B, n, D]``
    by a decoder attention module: its own ``q_proj``/``k_proj``, or the matching slice of a fused
    ``qkv_proj`` (Phi-3: queries, then keys, then values). The fused module is called whole, as the
    model calls it, so a quantised or adapted linear layer projects the same way."""
    own = getattr(module, f"{part}_proj", None)
    if own is not None:
        return own(hidden_states)
    q_size = module.config.num_attention_heads * module.head_dim
    k_size = module.config.num_key_value_heads * module.head_dim
    start, size = (0, q_size) if part == "q" else (q_size, k_size)
    return module.qkv_proj(hidden_states)[..., start : start + size]


def window_queries(module: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """Post-RoPE queries ``[B, H, w, d]`` of ``hidden_states [B, w, D]``, from the layer's own projection.

    ``position_embeddings`` are the layer's ``(cos, sin)`` for the whole prompt; the last ``w``
    positions are used (the window ends the prompt).
    """
    b, w, _ = hidden_states.shape
    q = projection(module, hidden_states, "q").view(b, w, -1, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    cos, sin = position_embeddings
    return layer_rope(module, q, cos[:, -w:], sin[:, -w:])


def layer_rope(module: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`apply_rope` as the attention ``module`` applies it: not at all in the layers that use no
    position embedding (SmolLM3's NoPE layers, ``use_rope=False``)."""
    return apply_rope(x, cos, sin) if getattr(module, "use_rope", True) else x


def prerope_keys(module: nn.Module, hidden_states: Tensor) -> Tensor:
    """Keys ``[B, Hkv, L, d]`` of ``hidden_states [B, L, D]`` before the rotary embedding (after the key
    norm where the layer has one): their geometry does not depend on position."""
    b, length, _ = hidden_states.shape
    k = projection(module, hidden_states, "k").view(b, length, -1, module.head_dim).transpose(1, 2)
    return module.k_norm(k) if hasattr(module, "k_norm") else k
