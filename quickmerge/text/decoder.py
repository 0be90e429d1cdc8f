"""What the presses need to know about a Hugging Face causal LM's decoder (transformers 5.x).

The decoder layers and their self-attention modules, the arguments the attention receives,
the additive mask for new tokens after a compressed cache, and the post-RoPE queries of a
window of hidden states recomputed from the layer's own projection.
"""

from __future__ import annotations

import difflib
import warnings

import torch
from torch import Tensor, nn

from .cache import cache_arg, cache_kwargs
from .latent import attended_keys, is_latent_attention, latent_heads

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
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "OlmoForCausalLM",
    "Olmo2ForCausalLM",
    "Olmo3ForCausalLM",
    "OlmoeForCausalLM",
    "GraniteForCausalLM",
    "GraniteMoeForCausalLM",
    "CohereForCausalLM",
    "Cohere2ForCausalLM",
    "GlmForCausalLM",
    "Glm4ForCausalLM",
    "Exaone4ForCausalLM",
    "Qwen2MoeForCausalLM",
    "Starcoder2ForCausalLM",
    "PhiForCausalLM",
    "SeedOssForCausalLM",
    "ApertusForCausalLM",
    "ArceeForCausalLM",
    "GptOssForCausalLM",
    "MinistralForCausalLM",
    "Ministral3ForCausalLM",
    "Glm4MoeForCausalLM",
    "Ernie4_5ForCausalLM",
    "Ernie4_5_MoeForCausalLM",
    "HeliumForCausalLM",
    "VaultGemmaForCausalLM",
    "CwmForCausalLM",
    "SolarOpenForCausalLM",
    "Dots1ForCausalLM",
    "FlexOlmoForCausalLM",
    "Jais2ForCausalLM",
    "StableLmForCausalLM",
    "PhimoeForCausalLM",
    "NemotronForCausalLM",
    "GraniteMoeSharedForCausalLM",
    "BitNetForCausalLM",
    "MiniMaxM2ForCausalLM",
    "AriaTextForCausalLM",
    "HyperCLOVAXForCausalLM",
    "MellumForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "Glm4MoeLiteForCausalLM",
    "YoutuForCausalLM",
    "Mistral4ForCausalLM",
    "MiniCPM3ForCausalLM",
    "Kimi_K25ForConditionalGeneration",
    "Mistral3ForConditionalGeneration",
    "Qwen3_5ForCausalLM",
    "Qwen3_5MoeForCausalLM",
    "Qwen3NextForCausalLM",
    "Qwen3_5ForConditionalGeneration",
    "Lfm2ForCausalLM",
    "Lfm2MoeForCausalLM",
    "Lfm2VlForConditionalGeneration",
    "Lfm3ForCausalLM",
    "Lfm3VlForConditionalGeneration",
    "OlmoHybridForCausalLM",
    "GraniteMoeHybridForCausalLM",
    "FalconH1ForCausalLM",
    "BambaForCausalLM",
    "JambaForCausalLM",
    "NemotronHForCausalLM",
    "GPTNeoXForCausalLM",
    "PersimmonForCausalLM",
    "OPTForCausalLM",
    "GPT2LMHeadModel",
    "GPTBigCodeForCausalLM",
    "BioGptForCausalLM",
    "KimiLinearForCausalLM",
    "Gemma4ForCausalLM",
    "Gemma4ForConditionalGeneration",
    "Llama4ForCausalLM",
    "Llama4ForConditionalGeneration",
    "Gemma3nForCausalLM",
    "Gemma3nForConditionalGeneration",
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration",
    "LlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration",
    "LlavaNextVideoForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
    "PaliGemmaForConditionalGeneration",
    "Idefics3ForConditionalGeneration",
    "SmolVLMForConditionalGeneration",
    "InternVLForConditionalGeneration",
    "AyaVisionForConditionalGeneration",
)
ROTATIONS = ("half", "interleaved", "split", "deinterleaved", "none")
FIXED_STATE_MIXERS = ("linear_attn", "mamba", "conv")  # a hybrid layer's token mixers whose state has a fixed size
POSITION_KWARGS = ("position_embeddings", "position_ids", "cache_position")  # what a layer may read positions from
ROTATION_TOLERANCE = 0.02  # relative error: low-precision caches round near 1e-3, a wrong rotation errs near 1


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (``model.model``, or its ``language_model`` (Idefics3's and SmolVLM's
    ``text_model``), or that one's ``model`` where a vision-language model holds a whole causal LM: Llama 4's; OPT's
    ``model.decoder``; GPT-NeoX's ``gpt_neox``, its ``base_model_prefix``)."""
    base = getattr(model, "model", None)
    if base is None:
        base = getattr(model, getattr(model, "base_model_prefix", "") or "model", model)
    for text in ("language_model", "text_model"):
        if isinstance(getattr(base, text, None), nn.Module):
            base = getattr(base, text)
            break
    for inner in ("model", "decoder"):  # a whole causal LM inside (Llama 4's); OPT's decoder
        if not stacked_layers(base) and hasattr(base, inner):
            base = getattr(base, inner)
    return base


def stacked_layers(base: nn.Module) -> list[nn.Module]:
    """The decoder layers of a decoder stack, in order: its ``layers`` (GPT-2's ``h``); empty if it has none."""
    layers = getattr(base, "layers", None)
    return list(layers if layers is not None else getattr(base, "h", None) or [])


def attention_of(layer: nn.Module) -> nn.Module | None:
    """A decoder layer's self-attention module: its ``self_attn`` (GPT-NeoX's ``attention``, GPT-2's ``attn``), or its
    ``mixer`` where that attends (Nemotron-H gives each layer one mixer: attention, Mamba 2, or an MLP); None for a
    layer without one."""
    attn = getattr(layer, "self_attn", None)
    for name in ("attention", "attn"):  # GPT-NeoX's, GPT-2's
        if attn is None and isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    mixer = getattr(layer, "mixer", None)
    if attn is None and mixer is not None and (hasattr(mixer, "k_proj") or hasattr(mixer, "qkv_proj")):
        return mixer
    return attn


def has_attention(layer: nn.Module) -> bool:
    """Whether a decoder layer attends with keys and values it projects itself, into a cache layer of its own
    (separate ``q_proj``/``k_proj``/``v_proj``, Phi-3's fused ``qkv_proj``, GPT-NeoX's ``query_key_value``, GPT-2's
    ``c_attn``, or a latent attention's, :func:`~quickmerge.text.latent.is_latent_attention`; not a layer that reads
    another layer's, :func:`shares_kv`, nor one declared a linear attention, as MiniMax's lightning attention)."""
    attn = attention_of(layer)
    projects = any(hasattr(attn, name) for name in ("k_proj", "qkv_proj", "query_key_value", "c_attn"))
    projects = projects or is_latent_attention(attn)
    return attn is not None and projects and not shares_kv(attn) and declared_type(layer) != "linear_attention"


def declared_type(layer: nn.Module) -> str | None:
    """The kind of layer a decoder layer is declared to be: its attention's or its own ``layer_type`` (MiniMax's,
    on the attention from transformers 5.2x, on the layer before), its ``block_type`` (Nemotron-H's), or its entry of
    ``config.layer_types``; None if nothing says."""
    attn = attention_of(layer)
    for owner, name in ((attn, "layer_type"), (layer, "layer_type"), (layer, "block_type")):
        if isinstance(getattr(owner, name, None), str):
            return getattr(owner, name)
    types = getattr(getattr(attn, "config", None), "layer_types", None)
    index = getattr(attn, "layer_idx", None)
    return types[index] if types and isinstance(index, int) and 0 <= index < len(types) else None


def keeps_fixed_state(layer: nn.Module) -> bool:
    """Whether a hybrid model's decoder layer mixes tokens through a state that does not grow with the prompt:
    a linear attention (Qwen 3.5's ``linear_attn``; Kimi Linear's delta attention, which sits at ``self_attn``, with
    its ``conv1d``), a state-space block (``mamba``: Granite 4, Falcon-H1, Bamba, Jamba; Nemotron-H's Mamba 2
    ``mixer``, with its ``conv1d``) or a short convolution (LFM2's ``conv``). Falcon-H1's layers run one beside their
    attention."""
    if any(getattr(layer, name, None) is not None for name in FIXED_STATE_MIXERS):
        return True
    return (hasattr(getattr(layer, "mixer", None), "conv1d")
            or (declared_type(layer) == "linear_attention" and hasattr(getattr(layer, "self_attn", None), "conv1d")))


def mixes_no_tokens(layer: nn.Module) -> bool:
    """Whether a decoder layer is a feed-forward block only: Nemotron-H's MLP (``up_proj``/``down_proj``) and
    mixture-of-experts (``experts``) layers."""
    mixer = getattr(layer, "mixer", None)
    if mixer is None or getattr(layer, "self_attn", None) is not None:
        return False
    return not hasattr(mixer, "conv1d") and (
        (hasattr(mixer, "up_proj") and hasattr(mixer, "down_proj")) or hasattr(mixer, "experts"))


def attention_scale(module: nn.Module) -> float:
    """The factor on an attention module's query-key products: its ``scaling``, or, before transformers 5.2x gave
    GPT-2 one, GPT-2's rule: ``1 / sqrt(head_dim)`` where ``scale_attn_weights``, divided by ``layer_idx + 1`` where
    ``scale_attn_by_inverse_layer_idx``."""
    scaling = getattr(module, "scaling", None)
    if scaling is not None:
        return float(scaling)
    scale = head_dim_of(module) ** -0.5 if module.scale_attn_weights else 1.0
    return scale / (module.layer_idx + 1) if getattr(module, "scale_attn_by_inverse_layer_idx", False) else scale


def check_attention_interface(attentions: list[nn.Module]) -> None:
    """Raise :class:`UnsupportedAttentionError` for an attention module that predates transformers' attention
    interface (no ``scaling``: Nemotron's before transformers 5.13; GPT-2's rule is known, :func:`attention_scale`),
    whose logits the presses cannot recompute."""
    old = [attn for attn in attentions if getattr(attn, "scaling", None) is None and not hasattr(
        attn, "scale_attn_weights")]
    if old:
        raise UnsupportedAttentionError(unsupported_message(old[0], (
            f"it keeps no `scaling` (an attention implementation older than transformers' attention interface, as "
            f"{type(old[0]).__name__}); a later transformers may give it one (Nemotron's: 5.13)")))
    configless = [attn for attn in attentions if getattr(attn, "config", None) is None]
    if configless:
        raise UnsupportedAttentionError(unsupported_message(configless[0], (
            "it keeps no `config` (an attention implementation older than transformers' attention interface)")))


def crosses_kv_heads(attention: nn.Module) -> bool:
    """Whether an attention module pairs the values of one KV head with the keys of another: DiffLlama's differential
    attention (its ``lambda_q1``...) splits the value heads in two halves and repeats each for every head."""
    return hasattr(attention, "lambda_q1")


def check_dense(attentions: list[nn.Module]) -> None:
    """Raise :class:`UnsupportedAttentionError` for attention modules that read only the keys an ``indexer`` of their
    own picks for each query (DeepSeek Sparse Attention: DeepSeek V3.2, GLM-5), an indexer whose keys the cache keeps
    beside the layer's in a layer the presses do not shorten."""
    indexed = [attn for attn in attentions if getattr(attn, "indexer", None) is not None]
    if indexed:
        raise UnsupportedAttentionError(unsupported_message(indexed[0], (
            f"layers {[attn.layer_idx for attn in indexed]} attend to the keys an indexer of their own picks for each "
            "query (DeepSeek Sparse Attention), whose own keys the cache keeps beside theirs")))


def shares_kv(attention: nn.Module) -> bool:
    """Whether an attention module reads the keys and values of an earlier layer and keeps no cache of its own
    (Gemma 3n's and Gemma 4's last ``num_kv_shared_layers`` layers)."""
    return bool(getattr(attention, "is_kv_shared_layer", False))


def kv_sources(model: nn.Module, layers: list[nn.Module]) -> dict[int, int]:
    """``{layer: source}`` for each decoder layer of ``layers`` that reads another layer's keys and values: the
    last layer of its attention type (``config.layer_types``) before the sharing starts, the one that stores them
    (``store_full_length_kv``). Empty for models without sharing. Raises :class:`UnsupportedAttentionError`
    when the config announces shared layers the modules do not show, or a source cannot be told (a changed
    transformers convention would otherwise merge a cache that layers read without the press's masks)."""
    config = getattr(base_model(model), "config", None)
    announced = int(getattr(config, "num_kv_shared_layers", 0) or 0)
    shared = [i for i, layer in enumerate(layers) if shares_kv(attention_of(layer))]
    if len(shared) != announced:
        raise UnsupportedAttentionError(
            f"{type(model).__name__}'s config says its last {announced} layers reuse earlier layers' keys and values "
            f"(num_kv_shared_layers), but layers {shared} are marked so (is_kv_shared_layer): this transformers "
            "release shares them in a way the presses do not know"
        )
    if not shared:
        return {}
    types, first = list(config.layer_types), len(layers) - announced
    sources = {}
    for i in shared:
        own = [j for j in range(first) if types[j] == types[i]]
        source = own[-1] if own else None
        attn = attention_of(layers[source]) if source is not None else None
        if attn is None or shares_kv(attn) or not getattr(attn, "store_full_length_kv", True):
            raise UnsupportedAttentionError(
                f"layer {i} of {type(model).__name__} reuses the keys and values of an earlier layer, which the "
                f"presses cannot tell (no layer of type {types[i]!r} before layer {first} stores them)"
            )
        sources[i] = source
    return sources


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM: each attends (:func:`has_attention`), reads an earlier layer's keys and
    values (:func:`shares_kv`) or, in a hybrid model, mixes tokens through a state that does not grow with the prompt
    (:func:`keeps_fixed_state`) or not at all (:func:`mixes_no_tokens`). Raises TypeError if a layer does none of
    these, or none attends."""
    layers = stacked_layers(base_model(model))
    if not any(has_attention(layer) for layer in layers):
        raise TypeError(
            f"{type(model).__name__} has no decoder layers with q/k/v-projected self-attention to patch; "
            f"{architecture_hint(model)}"
        )
    unknown = [i for i, layer in enumerate(layers) if not (
        has_attention(layer) or shares_kv(attention_of(layer)) or keeps_fixed_state(layer) or mixes_no_tokens(layer))]
    if unknown:
        raise TypeError(
            f"layers {unknown} of {type(model).__name__} neither attend with q/k/v projections into a cache layer of "
            "their own nor run a linear attention, a state-space block or a short convolution the presses know (a "
            "hybrid model's layers of another kind, or MiniMax's lightning attention, whose state the model keeps "
            f"in a cache class of its own); {architecture_hint(model)}"
        )
    crossing = [i for i, layer in enumerate(layers) if any(
        getattr(layer, name, None) is not None for name in ("encoder_attn", "crossattention"))]
    if crossing:
        raise TypeError(
            f"layers {crossing} of {type(model).__name__} attend to an encoder's output too (cross-attention: the "
            "decoder of an encoder-decoder model), whose cache the presses do not know; "
            f"{architecture_hint(model)}"
        )
    kv_sources(model, layers)  # refuses sharing it cannot follow, before any work
    return layers


def decoder_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a causal LM's decoder layers that keep a cache layer of their own (a hybrid
    model's attending layers; not those reading an earlier layer's keys, :func:`shares_kv`); raises if there are
    none."""
    return [attention_of(layer) for layer in decoder_layers(model) if has_attention(layer)]


def architecture_hint(model: nn.Module) -> str:
    """Where the tested architectures are listed, and those nearest ``model``'s class: a tested class it
    subclasses, else the tested names closest to its own (for warnings and refusals; the whole list is long)."""
    cls = type(model)
    where = f"{len(SUPPORTED_ARCHITECTURES)} tested architectures in quickmerge.text.SUPPORTED_ARCHITECTURES"
    if cls.__name__ in SUPPORTED_ARCHITECTURES:
        return f"{cls.__name__} is one of the {where}"
    base = next((b.__name__ for b in cls.__mro__[1:] if b.__name__ in SUPPORTED_ARCHITECTURES), None)
    if base is not None:
        return f"{cls.__name__} subclasses {base}, one of the {where}"
    near = difflib.get_close_matches(cls.__name__, SUPPORTED_ARCHITECTURES, n=3, cutoff=0.6)
    return where + (f"; nearest by name: {', '.join(near)}" if near else "")


def warn_if_untested(model: nn.Module, who: str) -> None:
    """Warn once per call when ``model``'s class is not among the tested architectures."""
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        warnings.warn(
            f"{who} is untested on {type(model).__name__} (where it recomputes queries, each prompt "
            f"checks the layer's keys first and a layer it cannot follow is refused); "
            f"{architecture_hint(model)}",
            stacklevel=4,
        )


def hidden_states_arg(args: tuple, kwargs: dict) -> Tensor:
    """The ``hidden_states`` a decoder layer or attention module was called with."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def sliding_window_of(attention: nn.Module) -> int | None:
    """The sliding window of a decoder attention module, or None for full attention.

    Qwen2/Qwen3/Gemma 3 set ``sliding_window`` per layer on the module; Mistral applies
    ``config.sliding_window`` to every layer; EXAONE 4 keeps the window on every module and says
    which layers use it in ``is_sliding``.
    """
    if getattr(attention, "is_sliding", True) is False:
        return None
    if is_chunked(attention):
        return attention.config.attention_chunk_size
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window or None
    return getattr(getattr(attention, "config", None), "sliding_window", None) or None


def is_chunked(attention: nn.Module) -> bool:
    """Whether an attention layer attends within fixed chunks (Llama 4's ``chunked_attention`` layers): its cache is
    bounded like a sliding window's, and the KV press leaves it alone as it does those."""
    config = getattr(attention, "config", None)
    types, index = getattr(config, "layer_types", None), getattr(attention, "layer_idx", None)
    return bool(types) and index is not None and index < len(types) and types[index] == "chunked_attention"


def cache_causal_mask(past: int, q_len: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Additive mask ``[1, 1, q, past + q]``: every cached entry visible, new tokens causal among themselves."""
    kv_len = past + q_len
    allowed = torch.arange(kv_len, device=device)[None, :] <= (past + torch.arange(q_len, device=device))[:, None]
    return torch.zeros(q_len, kv_len, device=device).masked_fill(~allowed, float("-inf")).to(dtype)[None, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, rotation: str = "half") -> Tensor:
    """Rotary position embedding of ``x [B, H, n, d]`` with ``cos``/``sin`` ``[1 or B, n, r]``.

    ``rotation``: ``"half"`` pairs channel ``i`` with ``i + r/2`` (Llama, Qwen, Mistral, Phi-3, Gemma,
    OLMo); ``"interleaved"`` pairs channels ``2i`` and ``2i + 1`` (Cohere, GLM; ``cos`` given in either
    layout); ``"split"`` pairs ``i`` with ``i + d/2`` with ``cos [.., d/2]`` given once per pair (gpt-oss);
    ``"deinterleaved"`` rotates as ``"interleaved"`` and then lays each pair's channels out as ``"half"`` does,
    even channels first (DeepSeek V3's ``rope_interleave``); ``"none"`` leaves ``x`` as it is (layers without a
    position embedding). Only the first ``r`` channels rotate: ``r < d`` where the model rotates part of each head
    (Phi-4-mini's ``partial_rotary_factor``, GLM); the rest pass unchanged, as in those models' own code."""
    if rotation == "none":
        return x
    if rotation == "deinterleaved":
        out = apply_rope(x, cos, sin, "interleaved")
        r = cos.shape[-1]
        return torch.cat((out[..., :r:2], out[..., 1:r:2], out[..., r:]), dim=-1)
    if rotation == "split":
        cos, sin, rotation = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1), "half"
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    if rotation == "interleaved":
        if torch.equal(cos[..., : r // 2], cos[..., r // 2 :]):  # given as Llama lays it out: [f, f]
            cos, sin = (t[..., : r // 2].repeat_interleave(2, dim=-1) for t in (cos, sin))
        rotated = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    elif rotation == "half":
        half = r // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    else:
        raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    return torch.cat((x_rot * cos.unsqueeze(1) + rotated * sin.unsqueeze(1), x_pass), dim=-1)


def projection(module: nn.Module, hidden_states: Tensor, part: str) -> Tensor:
    """The ``part`` (``"q"`` or ``"k"``) projection ``[B, n, heads * d]`` of ``hidden_states [B, n, D]``
    by a decoder attention module: its own ``q_proj``/``k_proj``, or the matching slice of a fused
    ``qkv_proj`` (Phi-3: queries, then keys, then values; GPT-2's ``c_attn`` alike) or ``query_key_value`` (GPT-NeoX:
    per head). The fused module is called whole, as the model calls it, so a quantised or adapted linear layer
    projects the same way."""
    own = getattr(module, f"{part}_proj", None)
    if own is not None:
        return own(hidden_states)
    d = head_dim_of(module)
    if hasattr(module, "c_attn"):  # GPT-2: every query head, then every key head, then every value head
        x = module.c_attn(hidden_states.contiguous())  # its Conv1D views its input flat
        q_size = module.config.num_attention_heads * d
        k_size = (x.shape[-1] - q_size) // 2
        return x[..., :q_size] if part == "q" else x[..., q_size : q_size + k_size]
    if hasattr(module, "query_key_value"):  # GPT-NeoX: each head's query, key and value in turn
        x = module.query_key_value(hidden_states)
        x = x.view(*x.shape[:-1], -1, 3 * d)
        return x[..., (0 if part == "q" else d) : (d if part == "q" else 2 * d)].flatten(-2)
    q_size = module.config.num_attention_heads * d
    k_size = getattr(module.config, "num_key_value_heads", module.config.num_attention_heads) * d
    start, size = (0, q_size) if part == "q" else (q_size, k_size)
    return module.qkv_proj(hidden_states)[..., start : start + size]


def heads(module: nn.Module, hidden_states: Tensor, part: str) -> Tensor:
    """Queries or keys ``[B, heads, n, d]`` of ``hidden_states [B, n, D]`` before the rotary embedding,
    normalised where the layer normalises them: ``q_norm``/``k_norm`` over each head (Qwen 3, Gemma 3;
    Cohere's per-head weights ``[heads, d]``) or over all heads at once (OLMo 2: a weight ``[heads * d]``); keys
    scaled where the layer scales them (Falcon-H1's ``key_multiplier``). A latent attention's: see
    :func:`latent_heads`."""
    if is_latent_attention(module):
        return latent_heads(module, hidden_states, part)
    b, n, _ = hidden_states.shape
    d = head_dim_of(module)
    x = projection(module, hidden_states, part)
    if part == "q" and x.shape[-1] == 2 * module.config.num_attention_heads * d:
        x = x.view(b, n, -1, 2 * d)[..., :d].flatten(2)  # Qwen 3.5: query, gate per head
    norm = getattr(module, f"{part}_norm", None)
    if norm is None:
        norm = getattr(module, f"{part}_layernorm", None)  # LFM2's name
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.dim() == 1 and weight.numel() == x.shape[-1] != d:
        x = norm(x)  # across heads, before the split
        norm = None
    x = x.reshape(b, n, -1, d)  # a slice of a fused projection (GPT-2) is not contiguous
    if norm is not None:
        x = norm(x)
    multiplier = getattr(module, "key_multiplier", None) if part == "k" else None  # Falcon-H1 (muP)
    return (x if multiplier is None else x * multiplier).transpose(1, 2)


def rotate(module: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, rotation: str) -> Tensor:
    """:func:`apply_rope` of the channels ``module`` rotates in each head of ``x [B, H, n, d]``: the first ones, or
    a latent attention's last ``qk_rope_head_dim`` (its part without position comes first)."""
    if not is_latent_attention(module):
        return apply_rope(x, cos, sin, rotation)
    tail = module.qk_rope_head_dim
    return torch.cat((x[..., :-tail], apply_rope(x[..., -tail:], cos, sin, rotation)), dim=-1)


def head_dim_of(module: nn.Module) -> int:
    """Channels per query or key head of an attention module (``head_dim``; GPT-NeoX's ``head_size``)."""
    return getattr(module, "head_dim", None) or module.head_size


def declared_rotation(module: nn.Module) -> str:
    """The rotation a layer is first tried with: none where it says it uses no position embedding
    (SmolLM3's ``use_rope=False``), else Llama's rotate-half."""
    return "half" if getattr(module, "use_rope", True) else "none"


def plain_rotary(module: nn.Module, position_embeddings: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
    """The layer's ``(cos, sin)`` as ``[B, n, r]``; None for a layer called without any (Jamba's, Granite 4's and
    Nemotron-H's attention layers use no position embedding). Qwen2-VL's and Qwen2.5-VL's multimodal rotary embedding
    (up to transformers 5.2x) arrives as ``[3, B, n, r]``, one row per axis (time, height, width); the
    attention takes each frequency band from its axis (``mrope_section``) and rotates as Llama does."""
    if position_embeddings is None:
        return None
    if isinstance(position_embeddings, Tensor) and position_embeddings.is_complex():
        # Llama 4: one complex number per pair of channels [B, n, r/2], pairs (2i, 2i + 1): the interleaved rotation
        return tuple(t.repeat_interleave(2, dim=-1) for t in (position_embeddings.real, position_embeddings.imag))
    cos, sin = position_embeddings
    if cos.dim() != 4:
        return cos, sin
    config = getattr(module, "config", None)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    section = params.get("mrope_section") if isinstance(params, dict) else None
    if not section:
        why = f"its rotary embedding has shape {tuple(cos.shape)} and no mrope_section in its config"
        raise UnsupportedAttentionError(unsupported_message(module, why))
    bands = list(section) * 2
    return tuple(torch.cat([band[i % 3] for i, band in enumerate(t.split(bands, dim=-1))], dim=-1) for t in (cos, sin))


def key_rotation(module: nn.Module, hidden_states: Tensor, keys: Tensor, position_embeddings: tuple | None,
                 check: int = 4) -> str:
    """How ``module`` rotates its keys, read off the keys it produced.

    The last ``check`` tokens' keys are recomputed from ``hidden_states [B, n, D]`` (the attention's input)
    and compared with the last ``check`` entries of ``keys [B, Hkv, L, d]`` (what the layer cached for the
    same tokens), trying each of :data:`ROTATIONS` (only ``"none"`` without ``position_embeddings``). Raises
    :class:`UnsupportedAttentionError` when none gives the layer's keys: the press would otherwise score the prompt
    with queries the model never computes (a query/key norm after the rotation, an unknown norm's name, a new
    rotation, a scale on the keys).
    """
    m = min(check, hidden_states.shape[1], keys.shape[2])
    rotary = plain_rotary(module, position_embeddings)
    cos, sin = (None, None) if rotary is None else (t[:, -m:].float() for t in rotary)
    target = keys[:, :, -m:].float()
    if not bool(torch.isfinite(target).all()):
        raise ValueError(
            f"layer {getattr(module, 'layer_idx', '?')} of the model cached keys that are not finite (NaN or inf): "
            f"the model overflowed in {keys.dtype} before the press saw them (Gemma 3 does in float16); run it in "
            "bfloat16 or float32"
        )
    with torch.no_grad():
        mine = heads(module, hidden_states[:, -m:], "k").float()
    if mine.shape != target.shape:
        why = f"it cached keys of shape {tuple(target.shape)} where its projections give {tuple(mine.shape)}"
        raise UnsupportedAttentionError(unsupported_message(module, why))
    scale = target.norm().clamp_min(1e-12)
    first = declared_rotation(module)
    errors = {}
    for rotation in ("none",) if rotary is None else (first, *(r for r in ROTATIONS if r != first)):
        try:
            rotated = rotate(module, mine, cos, sin, rotation)
        except RuntimeError:  # shapes this rotation cannot take ("split" with a whole head's cos)
            errors[rotation] = float("inf")
            continue
        errors[rotation] = float((rotated - target).norm() / scale)
        if errors[rotation] < ROTATION_TOLERANCE:
            return rotation
    why = f"no rotation of the keys recomputed from its projections gives the keys it cached (relative errors {errors})"
    raise UnsupportedAttentionError(unsupported_message(module, why))


def probed_rotation(module: nn.Module, hidden_states: Tensor, position_embeddings: tuple | None, check: int = 4) -> str:
    """:func:`key_rotation` of ``module`` when no cache holds its keys: its own forward (hooks bypassed)
    runs over the last ``check`` tokens of ``hidden_states [B, n, D]`` into a scratch cache."""
    from transformers import DynamicCache

    m = min(check, hidden_states.shape[1])
    tables = {}
    if position_embeddings is not None:  # None: a layer without rotary tables (OPT)
        tables["position_embeddings"] = tuple(t[..., -m:, :] for t in position_embeddings)  # also M-RoPE's [3, B, n, r]
    scratch = DynamicCache()
    with torch.no_grad():
        module.forward(hidden_states=hidden_states[:, -m:], attention_mask=None, **tables,
                       **cache_kwargs(module, scratch))
    layer = scratch.layers[module.layer_idx]
    return key_rotation(module, hidden_states, attended_keys(module, layer.keys, layer.values), position_embeddings,
                        check)


def logit_cap_and_sinks(module: nn.Module) -> tuple[float | None, Tensor | None]:
    """What an attention module does to its logits besides scaling: a cap ``c`` (``c * tanh(x / c)``, Gemma 2's
    ``attn_logit_softcapping``) and per-head sink logits ``[H]`` sharing the softmax (gpt-oss's ``sinks``)."""
    sinks = getattr(module, "sinks", None)
    return getattr(module, "attn_logit_softcapping", None) or None, sinks if isinstance(sinks, Tensor) else None


def unsupported_message(module: nn.Module, why: str) -> str:
    return (f"the press cannot follow the attention of {type(module).__name__} (layer "
            f"{getattr(module, 'layer_idx', '?')}): {why}. The {len(SUPPORTED_ARCHITECTURES)} tested "
            "architectures: quickmerge.text.SUPPORTED_ARCHITECTURES")


class UnsupportedAttentionError(NotImplementedError):
    """A decoder layer computes its queries and keys in a way the presses cannot recompute.

    Not a TypeError: transformers 5.0 runs a model's forward a second time after a TypeError inside it (to look for
    a missing ``**kwargs``), over a cache the first run had filled, and reports that run's error instead."""


def window_queries(module: nn.Module, hidden_states: Tensor, kwargs: dict, rotation: str) -> Tensor:
    """Post-RoPE queries ``[B, H, w, d]`` of ``hidden_states [B, w, D]``, from the layer's own projection.

    ``kwargs``: what the attention was called with for the whole prompt (its ``position_embeddings``, and the
    positions where the layer scales its queries by position, :func:`query_position_scale`); the last ``w``
    positions are used (the window ends the prompt). ``rotation``: from :func:`key_rotation`.
    """
    w = hidden_states.shape[1]
    queries = heads(module, hidden_states, "q")
    rotary = plain_rotary(module, kwargs.get("position_embeddings"))
    if rotary is not None:
        queries = rotate(module, queries, rotary[0][:, -w:], rotary[1][:, -w:], rotation)
    scale = query_position_scale(module, kwargs, w)
    return queries if scale is None else queries * scale.to(queries.dtype)


def query_position_scale(module: nn.Module, kwargs: dict, w: int) -> Tensor | None:
    """The factor ``[B or 1, 1, w, 1]`` by which the layer multiplies the post-RoPE queries of the last ``w``
    positions ``p`` it was called for, or None where it scales none. Ministral 3 (``llama_4_scaling_beta`` in its rope
    parameters): ``1 + beta * log(1 + floor(p / original_max_position_embeddings))``, 1 up to that length (16,384
    tokens in its checkpoints). Llama 4's layers without RoPE (``attn_temperature_tuning``):
    ``1 + attn_scale * log(1 + floor((p + 1) / floor_scale))``. Positions: the call's ``position_ids`` ``[B, n]``, else
    its ``cache_position`` ``[n]`` (what transformers before 5.4 scales Ministral 3's by), else (Llama 4, which counts
    them from its cache) the last ``w`` of the entries its cache layer holds after the call."""
    params = getattr(getattr(module, "config", None), "rope_parameters", None)
    beta = params.get("llama_4_scaling_beta") if isinstance(params, dict) else None
    tuned = getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True)
    if not beta and not tuned:
        return None
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = kwargs.get("cache_position")
    cache = cache_arg(kwargs)
    if positions is None and tuned and cache is not None:  # Llama 4 counts them from its cache, as here
        total = cache.layers[module.layer_idx].get_seq_length()  # after this call's update
        positions = torch.arange(total - w, total, device=cache.layers[module.layer_idx].keys.device)
    if positions is None:
        why = "it scales its queries by position and was called without position_ids"
        raise UnsupportedAttentionError(unsupported_message(module, why))
    positions = positions[..., -w:].float()
    if tuned:
        scale = 1 + module.attn_scale * torch.log1p(torch.floor((positions + 1) / module.floor_scale))
    else:
        scale = 1 + beta * torch.log1p(torch.floor(positions / params["original_max_position_embeddings"]))
    return scale.reshape(-1, 1, w, 1)


def prerope_keys(module: nn.Module, hidden_states: Tensor) -> Tensor:
    """Keys ``[B, Hkv, L, d]`` of ``hidden_states [B, L, D]`` before the rotary embedding (after the key
    norm where the layer has one): their geometry does not depend on position."""
    return heads(module, hidden_states, "k")
