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
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
)


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model``, or its ``language_model``)."""
    base = getattr(model, "model", model)
    return getattr(base, "language_model", base)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM; raises TypeError if it has none with q/k/v-projected attention."""
    layers = list(getattr(base_model(model), "layers", None) or [])
    attns = [getattr(layer, "self_attn", None) for layer in layers]
    if not attns or any(a is None or not hasattr(a, "k_proj") for a in attns):
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
    """Rotary position embedding of ``x [B, H, n, d]`` with ``cos``/``sin`` ``[1 or B, n, d]``
    (the rotate-half convention of Llama, Qwen, Mistral and Gemma)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)


def window_queries(module: nn.Module, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """Post-RoPE queries ``[B, H, w, d]`` of ``hidden_states [B, w, D]``, from the layer's own projection.

    ``position_embeddings`` are the layer's ``(cos, sin)`` for the whole prompt; the last ``w``
    positions are used (the window ends the prompt).
    """
    b, w, _ = hidden_states.shape
    q = module.q_proj(hidden_states).view(b, w, -1, module.head_dim).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q = module.q_norm(q)
    cos, sin = position_embeddings
    return apply_rope(q, cos[:, -w:], sin[:, -w:])


def prerope_keys(module: nn.Module, hidden_states: Tensor) -> Tensor:
    """Keys ``[B, Hkv, L, d]`` of ``hidden_states [B, L, D]`` before the rotary embedding (after the key
    norm where the layer has one): their geometry does not depend on position."""
    b, length, _ = hidden_states.shape
    k = module.k_proj(hidden_states).view(b, length, -1, module.head_dim).transpose(1, 2)
    return module.k_norm(k) if hasattr(module, "k_norm") else k
