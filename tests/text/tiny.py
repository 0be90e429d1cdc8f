"""Tiny random-weight causal LMs for the press tests, and independent references to compare with."""

from __future__ import annotations

import copy

import torch
import transformers

from quickmerge.text.cache import cache_kwargs, is_merged

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
KINDS = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen3-moe", "phi3", "smollm3", "gemma3", "gemma3-vlm")


def tiny(kind: str, attn: str = "sdpa", *, layers: int = 2, sliding_window: int | None = None, seed: int = 0):
    """A tiny model of ``kind``; Gemma 3 alternates sliding (window 8 unless given) and global layers.

    ``mixtral`` and ``qwen3-moe``: mixtures of 4 experts, 2 per token, under Mistral's and Qwen 3's attention;
    ``smollm3``: every second layer without a position embedding (NoPE), as SmolLM3 has;
    ``phi3``: Phi-3's fused ``qkv_proj``, rotating half of each head (Phi-4-mini's partial RoPE);
    ``gemma3-vlm``: ``Gemma3ForConditionalGeneration``, the same text model under a one-layer SigLIP
    tower (image token 96; an image is 4 tokens)."""
    torch.manual_seed(seed)
    common = {**COMMON, "num_hidden_layers": layers}
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=sliding_window))
    elif kind == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, sliding_window=sliding_window, num_local_experts=4, num_experts_per_tok=2))
    elif kind == "qwen3-moe":
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            **common, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32))
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16))
    elif kind == "smollm3":
        model = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(
            **common, no_rope_layer_interval=2, pad_token_id=0))
    elif kind == "phi3":
        config = transformers.Phi3Config(**common, sliding_window=sliding_window, partial_rotary_factor=0.5,
                                         pad_token_id=0)
        model = transformers.Phi3ForCausalLM(config)
    elif kind in ("gemma3", "gemma3-vlm"):
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(max(layers, 3))]
        config = transformers.Gemma3TextConfig(
            **{**common, "num_hidden_layers": len(types)}, head_dim=16, sliding_window=sliding_window or 8,
            layer_types=types,
        )
        if kind == "gemma3":
            model = transformers.Gemma3ForCausalLM(config)
        else:
            vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                          image_size=32, patch_size=8)
            model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
                text_config=config.to_dict(), vision_config=vision, mm_tokens_per_image=4, image_token_index=96,
                boi_token_index=94, eoi_token_index=95,
            ))
    else:
        raise ValueError(kind)
    model.set_attn_implementation(attn)
    return model.eval()


def duplicated_cache(cache):
    """A plain cache in which every merged entry appears ``size`` times.

    Softmax over s identical keys equals one key with ``+log(s)`` on its logit, so an
    unpatched model decoding on this cache computes exactly what proportional attention
    should: an oracle built without any of the press's hooks.
    """
    from transformers.cache_utils import DynamicLayer

    ref = copy.deepcopy(cache)
    for i, layer in enumerate(ref.layers):
        if not is_merged(layer):
            continue
        hkv = layer.keys.shape[1]
        groups = layer.log_sizes.shape[1] // hkv
        sizes = layer.log_sizes[:, ::groups, 0, :].exp().round().long()  # [B, Hkv, K]
        keys = torch.stack([torch.stack([torch.repeat_interleave(layer.keys[b, h], sizes[b, h], dim=0)
                                         for h in range(hkv)]) for b in range(sizes.shape[0])])
        values = torch.stack([torch.stack([torch.repeat_interleave(layer.values[b, h], sizes[b, h], dim=0)
                                           for h in range(hkv)]) for b in range(sizes.shape[0])])
        plain = DynamicLayer.__new__(DynamicLayer)
        plain.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in ("log_sizes", "positions")})
        plain.keys, plain.values = keys, values
        ref.layers[i] = plain
    return ref


@torch.no_grad()
def one_at_a_time(model, ids, cache, **kwargs):
    """Logits of ``ids [B, T]`` decoded one token per call (each call trivially sees the whole cache)."""
    steps = [model(ids[:, t : t + 1], **cache_kwargs(model, cache), **kwargs).logits for t in range(ids.shape[1])]
    return torch.cat(steps, 1)
