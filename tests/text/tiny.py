"""Tiny random-weight causal LMs for the press tests, and independent references to compare with."""

from __future__ import annotations

import copy

import torch
import transformers

from quickmerge.text.cache import cache_kwargs, is_merged
from quickmerge.text.decoder import base_model

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
# multi-head latent attention (keys and values expanded from one latent per token), among the further families
LATENT_KINDS = ("deepseek-v2-lite", "deepseek-v3", "glm4-moe-lite", "youtu", "mistral4", "minicpm3")
# more families, each checked by tests/text/test_architectures.py
MORE_KINDS = ("gemma", "gemma2", "olmo", "olmo2", "olmo3", "olmoe", "granite", "granitemoe", "cohere", "cohere2",
              "glm", "glm4", "exaone4", "qwen2-moe", "starcoder2", "phi", "seed-oss", "apertus", "arcee", "gpt-oss",
              "ministral", "ministral3", "glm4-moe", "ernie4.5", "ernie4.5-moe", "helium", "vaultgemma", "cwm",
              "solar-open", "dots1", "flex-olmo", "jais2", "mistral3-vlm", "gemma4", "gemma4-vlm", "llama4",
              "gemma3n", "gemma3n-vlm", "gemma4-shared", "stablelm", "phimoe", "nemotron", "granitemoe-shared",
              "bitnet", "minimax-m2", "aria-text", "hyperclovax", "mellum", "gpt-neox", "persimmon", "opt",
              "gpt2", "gpt-bigcode", "biogpt", *LATENT_KINDS)
# vision-language models tested on their own (tests/text/test_architectures.py): Llama 4's forward fails upstream on
# some transformers releases, so it stays out of the family tests
OWN_TEST_KINDS = ("llama4-vlm", "kimi-k2.5-vlm")
# hybrid models, attention layers amid layers of a fixed-size state (linear attention, Mamba, short convolutions): the
# KV press only (tests/text/test_hybrid.py)
HYBRID_KINDS = ("qwen3.5", "qwen3.5-moe", "qwen3-next", "qwen3.5-vl", "olmo-hybrid", "lfm2", "lfm2-moe", "lfm2-vl",
                "lfm3", "lfm3-vl", "granite4", "falcon-h1", "bamba", "jamba", "nemotron-h", "kimi-linear")
# vision-language models positioning tokens on three axes (multimodal RoPE): the KV press only
MROPE_KINDS = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl")
# the last layers read the keys and values of earlier ones (num_kv_shared_layers): 6 layers, the last 3 sharing
SHARING = ("gemma3n", "gemma3n-vlm", "gemma4-shared")
# sliding and global layers in turn
ALTERNATING = ("gemma2", "olmo3", "cohere2", "exaone4", "gpt-oss", "vaultgemma", "cwm", "ministral", "gemma4",
               "gemma4-vlm", "mellum", *SHARING)
# kinds a transformers release added after 5.0, or whose attention the presses follow from a release on (Nemotron's,
# which keeps no `scaling` before 5.13), or that transformers 5.0 itself cannot decode after a cache (StableLM under
# SDPA, Persimmon, without quickmerge): their class, the release
NEWER = {"gemma4": ("Gemma4ForCausalLM", "5.5"), "gemma4-vlm": ("Gemma4ForConditionalGeneration", "5.5"),
         "gemma4-shared": ("Gemma4ForCausalLM", "5.5"), "nemotron-h": ("NemotronHForCausalLM", "5.3"),
         "olmo-hybrid": ("OlmoHybridForCausalLM", "5.3"), "lfm3": ("Lfm3ForCausalLM", "5.23"),
         "lfm3-vl": ("Lfm3VlForConditionalGeneration", "5.23"),
         "nemotron": ("NemotronForCausalLM", "5.13"), "stablelm": ("StableLmForCausalLM", "5.2"),
         "persimmon": ("PersimmonForCausalLM", "5.2"),
         "hyperclovax": ("HyperCLOVAXForCausalLM", "5.12"), "mellum": ("MellumForCausalLM", "5.12"),
         "youtu": ("YoutuForCausalLM", "5.2"), "mistral4": ("Mistral4ForCausalLM", "5.5"),
         "minicpm3": ("MiniCPM3ForCausalLM", "5.13"), "kimi-k2.5-vlm": ("Kimi_K25ForConditionalGeneration", "5.13"),
         "kimi-linear": ("KimiLinearForCausalLM", "5.18")}


def too_old(kind: str) -> bool:
    """Whether this transformers predates what :data:`NEWER` says ``kind`` needs (the class, or Nemotron's attention
    before it took transformers' attention interface in 5.13)."""
    from packaging.version import Version

    return kind in NEWER and (not hasattr(transformers, NEWER[kind][0])
                              or Version(transformers.__version__) < Version(NEWER[kind][1]))


def _mrope(kind: str, common: dict):
    """:data:`MROPE_KINDS` with a one-layer vision tower (image tokens: begin 94, image 96, end 95; an image of
    grid (1, 4, 4) patches of 2 x 3 x 14 x 14 values is 4 tokens); frequency bands 2 / 3 / 3 on the three axes."""
    t = transformers
    tokens = dict(image_token_id=96, vision_start_token_id=94, vision_end_token_id=95)
    if kind == "qwen3-vl":
        text = {**common, "head_dim": 16, "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3],
                                                         "mrope_interleaved": True}}
        vision = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      deepstack_visual_indexes=[0])
        return t.Qwen3VLForConditionalGeneration(t.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens))
    text = {**common, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    if kind == "qwen2-vl":
        vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64)
        return t.Qwen2VLForConditionalGeneration(t.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens))
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64)
    return t.Qwen2_5_VLForConditionalGeneration(t.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens))


def _ministral3_config(common: dict):
    """Ministral 3 with its query scale ``1 + 0.1 log(1 + floor(p / 8))`` past position 8 (16,384 in its
    checkpoints), so that prompts of a few dozen tokens see it."""
    config = transformers.Ministral3Config(**common, head_dim=16)
    config.rope_parameters = {**config.rope_parameters, "original_max_position_embeddings": 8}
    return config


def mistral3_vlm(text_config):
    """``Mistral3ForConditionalGeneration`` (Ministral 3's and Mistral Small 3.x's checkpoints) over ``text_config``
    with a one-layer Pixtral tower: a 32 x 32 image is 4 tokens (image token 96)."""
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                  image_size=32, patch_size=8)
    return transformers.Mistral3ForConditionalGeneration(transformers.Mistral3Config(
        text_config=text_config.to_dict(), vision_config=vision, image_token_index=96, spatial_merge_size=2))


def _more(kind: str, common: dict, sliding_window: int | None):
    """Models of :data:`MORE_KINDS`: defaults of each config but the tiny sizes; ``ALTERNATING`` kinds
    alternate sliding (window 8 unless given) and global layers; some carry their family's trait on purpose
    (Granite's attention multiplier, Cohere's per-head query/key norms); Gemma 2's logit cap and gpt-oss's
    attention sinks are set where they change the attention of such small random models."""
    t = transformers
    if kind in ALTERNATING:
        layers = max(common["num_hidden_layers"], 6 if kind in SHARING else 3)
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        common = {**common, "num_hidden_layers": layers, "layer_types": types, "sliding_window": sliding_window or 8}
    moe = dict(num_experts=4, num_experts_per_tok=2)
    hybrid = dict(**{**common, "num_hidden_layers": max(common["num_hidden_layers"], 4)}, head_dim=16, pad_token_id=0,
                  linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
    hybrid_moe = dict(**moe, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    # state-space hybrids: layers 0 and 2 run a Mamba 2 block (4 heads of 32 channels, state 16) or a convolution
    four = {**common, "num_hidden_layers": 4}
    mamba2 = dict(mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_n_groups=1, mamba_expand=2)
    lfm2 = {**four, "layer_types": ["conv", "full_attention", "conv", "full_attention"]}
    # wider global heads, keys that are the values there (k_eq_v), an input of its own to each layer
    gemma4 = dict(**common, head_dim=16, global_head_dim=32, attention_k_eq_v=True, num_global_key_value_heads=2,
                  hidden_size_per_layer_input=8, vocab_size_per_layer_input=common["vocab_size"], pad_token_id=0)
    gemma3n = dict(**common, head_dim=16, num_kv_shared_layers=3, hidden_size_per_layer_input=8,
                   vocab_size_per_layer_input=common["vocab_size"], pad_token_id=0, laurel_rank=4, altup_num_inputs=2,
                   activation_sparsity_pattern=[0.0] * common["num_hidden_layers"])
    llama4 = dict(**{**common, "num_hidden_layers": max(common["num_hidden_layers"], 4)}, head_dim=16, pad_token_id=0,
                  num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=96, attention_chunk_size=8,
                  no_rope_layer_interval=2, use_qk_norm=True, floor_scale=4, attn_scale=0.5)
    # latent attention: a latent of 32 channels per token, 4 heads of 16 channels without position and 8 rotated
    # (shared by the heads' keys), values of 12; queries through a rank-24 bottleneck but in DeepSeek-V2-Lite
    latent = dict(**{**common, "num_key_value_heads": common["num_attention_heads"]}, kv_lora_rank=32, q_lora_rank=24,
                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, pad_token_id=0)
    mha = {k: v for k, v in common.items() if k != "num_key_value_heads"}
    gpt2 = dict(vocab_size=common["vocab_size"], n_embd=common["hidden_size"], n_inner=common["intermediate_size"],
                n_layer=common["num_hidden_layers"], n_head=common["num_attention_heads"],
                n_positions=common["max_position_embeddings"])
    latent_moe = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                      n_group=1, topk_group=1)
    build = {
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**common, head_dim=16)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**common, head_dim=16, attn_logit_softcapping=0.05)),
        "olmo": lambda: t.OlmoForCausalLM(t.OlmoConfig(**common)),
        "olmo2": lambda: t.Olmo2ForCausalLM(t.Olmo2Config(**common)),
        "olmo3": lambda: t.Olmo3ForCausalLM(t.Olmo3Config(**common)),
        "olmoe": lambda: t.OlmoeForCausalLM(t.OlmoeConfig(**common, **moe)),
        "granite": lambda: t.GraniteForCausalLM(t.GraniteConfig(**common, attention_multiplier=0.05)),
        "granitemoe": lambda: t.GraniteMoeForCausalLM(t.GraniteMoeConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, attention_multiplier=0.05)),
        "cohere": lambda: t.CohereForCausalLM(t.CohereConfig(**common, use_qk_norm=True)),
        "cohere2": lambda: t.Cohere2ForCausalLM(t.Cohere2Config(**common)),
        "glm": lambda: t.GlmForCausalLM(t.GlmConfig(**common, head_dim=16, pad_token_id=0)),
        "glm4": lambda: t.Glm4ForCausalLM(t.Glm4Config(**common, head_dim=16, pad_token_id=0)),
        "exaone4": lambda: t.Exaone4ForCausalLM(t.Exaone4Config(**common, pad_token_id=0)),  # 5.0 reads it
        "qwen2-moe": lambda: t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
            **common, **moe, moe_intermediate_size=32, shared_expert_intermediate_size=32)),
        "starcoder2": lambda: t.Starcoder2ForCausalLM(t.Starcoder2Config(**common)),
        "phi": lambda: t.PhiForCausalLM(t.PhiConfig(**common, pad_token_id=0)),
        "seed-oss": lambda: t.SeedOssForCausalLM(t.SeedOssConfig(**common, head_dim=16)),
        "apertus": lambda: t.ApertusForCausalLM(t.ApertusConfig(**common)),
        "arcee": lambda: t.ArceeForCausalLM(t.ArceeConfig(**common)),
        "gpt-oss": lambda: t.GptOssForCausalLM(t.GptOssConfig(
            **common, head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
        "ministral": lambda: t.MinistralForCausalLM(t.MinistralConfig(**common, head_dim=16)),
        "ministral3": lambda: t.Ministral3ForCausalLM(_ministral3_config(common)),
        "glm4-moe": lambda: t.Glm4MoeForCausalLM(t.Glm4MoeConfig(
            **common, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=1, use_qk_norm=True, pad_token_id=0)),
        "ernie4.5": lambda: t.Ernie4_5ForCausalLM(t.Ernie4_5Config(**common, head_dim=16, pad_token_id=0)),
        "ernie4.5-moe": lambda: t.Ernie4_5_MoeForCausalLM(t.Ernie4_5_MoeConfig(
            **common, moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1,
            pad_token_id=0)),
        "helium": lambda: t.HeliumForCausalLM(t.HeliumConfig(**common, head_dim=16, pad_token_id=0)),
        "vaultgemma": lambda: t.VaultGemmaForCausalLM(t.VaultGemmaConfig(**common, head_dim=16, pad_token_id=0)),
        "cwm": lambda: t.CwmForCausalLM(t.CwmConfig(**common, head_dim=16, pad_token_id=0)),
        "solar-open": lambda: t.SolarOpenForCausalLM(t.SolarOpenConfig(
            **common, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            pad_token_id=0)),
        "dots1": lambda: t.Dots1ForCausalLM(t.Dots1Config(
            **common, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=1, pad_token_id=0)),
        "flex-olmo": lambda: t.FlexOlmoForCausalLM(t.FlexOlmoConfig(**common, num_experts=4, num_experts_per_tok=2,
                                                                   pad_token_id=0)),
        "jais2": lambda: t.Jais2ForCausalLM(t.Jais2Config(**common, head_dim=16, pad_token_id=0)),
        # StableLM 2 (a quarter of each head rotated), Phi-3.5-MoE, Nemotron-4 / Minitron (half rotated), Granite-MoE
        # with a shared expert, BitNet (ternary weights), MiniMax-M2 (norms over all query and key heads), Aria's text
        "stablelm": lambda: t.StableLmForCausalLM(t.StableLmConfig(**common, pad_token_id=0)),
        "phimoe": lambda: t.PhimoeForCausalLM(t.PhimoeConfig(**common, num_local_experts=4, num_experts_per_tok=2,
                                                            pad_token_id=0)),
        "nemotron": lambda: t.NemotronForCausalLM(t.NemotronConfig(**common, head_dim=16, pad_token_id=0)),
        "granitemoe-shared": lambda: t.GraniteMoeSharedForCausalLM(t.GraniteMoeSharedConfig(
            **common, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32, pad_token_id=0)),
        "bitnet": lambda: t.BitNetForCausalLM(t.BitNetConfig(**common, pad_token_id=0)),
        "minimax-m2": lambda: t.MiniMaxM2ForCausalLM(t.MiniMaxM2Config(
            **common, head_dim=16, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)),
        "aria-text": lambda: t.AriaTextForCausalLM(t.AriaTextConfig(
            **common, head_dim=16, moe_num_experts=4, moe_topk=2, moe_num_shared_experts=1, pad_token_id=0)),
        # HyperCLOVA X (an attention multiplier, as Granite's, and norms after each block), Mellum (sliding and global
        # layers in turn, experts)
        "hyperclovax": lambda: t.HyperCLOVAXForCausalLM(t.HyperCLOVAXConfig(
            **common, head_dim=16, attention_multiplier=0.3, pad_token_id=0)),
        "mellum": lambda: t.MellumForCausalLM(t.MellumConfig(
            **common, head_dim=16, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)),
        # DeepSeek-V2-Lite (complex rotary tables, pairs interleaved), DeepSeek V3 (its rope_interleave: the pairs
        # rotated, then laid out halves first), GLM-4.7-Flash, Youtu-LLM, Mistral 4, MiniCPM3
        "deepseek-v2-lite": lambda: t.DeepseekV2ForCausalLM(t.DeepseekV2Config(
            **{**latent, "q_lora_rank": None}, **latent_moe)),
        "deepseek-v3": lambda: t.DeepseekV3ForCausalLM(t.DeepseekV3Config(**latent, **latent_moe)),
        "glm4-moe-lite": lambda: t.Glm4MoeLiteForCausalLM(t.Glm4MoeLiteConfig(**latent, **latent_moe)),
        "youtu": lambda: t.YoutuForCausalLM(t.YoutuConfig(**latent)),
        "mistral4": lambda: t.Mistral4ForCausalLM(t.Mistral4Config(**latent, **latent_moe)),
        "minicpm3": lambda: t.MiniCPM3ForCausalLM(t.MiniCPM3Config(**latent)),
        # Kimi K2.5's checkpoints: DeepSeek V3 under a one-layer vision tower (Qwen's grid of patches, 3 x 4 x 4
        # values each, 2 x 2 merged into a token: 4 x 4 patches are 4 tokens, id 96 between 94 and 95)
        "kimi-k2.5-vlm": lambda: t.Kimi_K25ForConditionalGeneration(t.Kimi_K25Config(
            text_config=dict(model_type="deepseek_v3", **latent, **latent_moe), projection_hidden_size=32,
            vision_config=dict(patch_size=4, num_attention_heads=2, num_hidden_layers=1, hidden_size=32,
                               intermediate_size=48, pos_emb_height=8, pos_emb_width=8),
            image_token_id=96, video_token_id=93, vision_start_token_id=94, vision_end_token_id=95)),
        # GPT-NeoX (Pythia: each head's query, key and value from one fused projection, a quarter of each head
        # rotated) and Persimmon (the same fused layout, half rotated, query and key layer norms per head); neither
        # groups its KV heads
        "gpt-neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**mha)),
        "persimmon": lambda: t.PersimmonForCausalLM(t.PersimmonConfig(**mha, qk_layernorm=True, pad_token_id=0)),
        # OPT: learned absolute positions added to the embeddings, no rotation, its layers under model.decoder
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(**{k: v for k, v in mha.items() if k != "intermediate_size"},
                                                    ffn_dim=96, word_embed_proj_dim=64, pad_token_id=0)),
        # GPT-2 (its layers under transformer.h, one fused c_attn; scaled by the inverse layer index too, as some of
        # its checkpoints are) and GPT-BigCode (StarCoder 1, SantaCoder: the same, one KV head for all)
        "biogpt": lambda: t.BioGptForCausalLM(t.BioGptConfig(**mha, pad_token_id=0)),  # learned positions, as OPT
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(**gpt2, scale_attn_by_inverse_layer_idx=True)),
        "gpt-bigcode": lambda: t.GPTBigCodeForCausalLM(t.GPTBigCodeConfig(**gpt2, multi_query=True)),
        "mistral3-vlm": lambda: mistral3_vlm(_ministral3_config(common)),
        # chunked attention with RoPE and a qk L2 norm, then a global layer without RoPE whose queries are
        # temperature-tuned by position (from position 3 here, floor_scale 4; 8,192 in its checkpoints)
        "llama4": lambda: t.Llama4ForCausalLM(t.Llama4TextConfig(**llama4)),
        # Llama 4's checkpoints: the same under a one-layer vision tower (a 56 x 56 image, 4 x 4 patches shuffled to
        # 4 tokens, id 96), holding a whole Llama4ForCausalLM as its language model
        "llama4-vlm": lambda: t.Llama4ForConditionalGeneration(t.Llama4Config(
            text_config=llama4, image_token_index=96, pad_token_id=0,  # transformers 5.0 reads it here
            vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                               image_size=56, patch_size=14, vision_output_dim=64, projector_input_dim=64,
                               projector_output_dim=64, pixel_shuffle_ratio=0.5))),
        "gemma4": lambda: t.Gemma4ForCausalLM(t.Gemma4TextConfig(**gemma4)),
        # layers 3-5 read the keys and values of layers 1 (global) and 2 (sliding), as Gemma 4's small checkpoints do
        "gemma4-shared": lambda: t.Gemma4ForCausalLM(t.Gemma4TextConfig(**gemma4, num_kv_shared_layers=3)),
        "gemma3n": lambda: t.Gemma3nForCausalLM(t.Gemma3nTextConfig(**gemma3n)),
        # Gemma 3n's checkpoints: the same under a tiny timm tower (a 64 x 64 image is 2 x 2 = 4 tokens, id 96;
        # begin 94, end 95) and a one-layer audio tower
        "gemma3n-vlm": lambda: t.Gemma3nForConditionalGeneration(t.Gemma3nConfig(
            text_config=gemma3n, vision_soft_tokens_per_image=4, audio_soft_tokens_per_image=4, image_token_id=96,
            boi_token_id=94, eoi_token_id=95, audio_token_id=93, boa_token_id=92, eoa_token_id=91,
            vision_config=dict(architecture="test_convnext", hidden_size=64, vocab_size=8, vocab_offset=97),
            audio_config=dict(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1, vocab_size=8,
                              vocab_offset=105, input_feat_size=16))),
        # Gemma 4's checkpoints: the same under a one-layer vision tower (a 6 x 6 patch image pools to 4 tokens)
        "gemma4-vlm": lambda: t.Gemma4ForConditionalGeneration(t.Gemma4Config(
            text_config=t.Gemma4TextConfig(**gemma4).to_dict(), image_token_id=96, boi_token_id=94, eoi_token_id=95,
            video_token_id=93, audio_token_id=92, boa_token_id=91, eoa_token_index=90,
            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=3,
                               position_embedding_size=64))),
        # three linear-attention (gated DeltaNet) layers to one attention layer, whose queries carry a gate
        "qwen3.5": lambda: t.Qwen3_5ForCausalLM(t.Qwen3_5TextConfig(**hybrid)),
        "qwen3.5-moe": lambda: t.Qwen3_5MoeForCausalLM(t.Qwen3_5MoeTextConfig(**hybrid, **hybrid_moe)),
        "qwen3-next": lambda: t.Qwen3NextForCausalLM(t.Qwen3NextConfig(**hybrid, **hybrid_moe)),
        # Qwen 3.5's checkpoints: the hybrid decoder under a one-layer vision tower (as tiny("qwen3-vl")'s)
        "qwen3.5-vl": lambda: t.Qwen3_5ForConditionalGeneration(t.Qwen3_5Config(
            text_config=hybrid, image_token_id=96, vision_start_token_id=94, vision_end_token_id=95,
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64))),
        # gated DeltaNet (linear attention) and attention in turn
        "olmo-hybrid": lambda: t.OlmoHybridForCausalLM(t.OlmoHybridConfig(
            **{**four, "layer_types": ["linear_attention", "full_attention"] * 2}, pad_token_id=0)),
        # short convolutions and attention in turn (LFM2, its mixture of experts after a dense first layer, LFM3)
        "lfm3": lambda: t.Lfm3ForCausalLM(t.Lfm3Config(  # its own pattern: conv 0, 1, 3, 5; global 2, 6; sliding 4
            **{**common, "num_hidden_layers": 7}, sliding_window=sliding_window or 8, pad_token_id=0)),
        # LFM3-VL's checkpoints: LFM3 under a two-layer tower (an image of grid (1, 4, 4) patches of 2 x 3 x 4 x 4
        # values is 4 tokens; image tokens as tiny("qwen3-vl")'s)
        "lfm3-vl": lambda: t.Lfm3VlForConditionalGeneration(t.Lfm3VlConfig(
            text_config=dict(**{**common, "num_hidden_layers": 7}, sliding_window=sliding_window or 8, pad_token_id=0,
                             model_type="lfm3"),
            image_token_id=96, video_token_id=93, vision_start_token_id=94, vision_end_token_id=95,
            vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=2, patch_size=4, temporal_patch_size=2, spatial_merge_size=2))),
        "lfm2": lambda: t.Lfm2ForCausalLM(t.Lfm2Config(**lfm2)),
        "lfm2-moe": lambda: t.Lfm2MoeForCausalLM(t.Lfm2MoeConfig(**lfm2, moe_intermediate_size=32, num_dense_layers=1,
                                                                  **moe)),
        # LFM2-VL's checkpoints: LFM2 under a one-layer SigLIP 2 tower (4 x 4 patches of 4 x 4 pixels: 4 tokens)
        "lfm2-vl": lambda: t.Lfm2VlForConditionalGeneration(t.Lfm2VlConfig(
            text_config=dict(model_type="lfm2", **lfm2), image_token_id=96, downsample_factor=2,
            projector_hidden_size=32, vision_config=dict(
                model_type="siglip2_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=2, patch_size=4, num_patches=64))),
        # Mamba 2 and attention without position embedding in turn (Granite 4's "-h" checkpoints), experts
        "granite4": lambda: t.GraniteMoeHybridForCausalLM(t.GraniteMoeHybridConfig(
            **four, **mamba2, layer_types=["mamba", "attention", "mamba", "attention"], num_local_experts=4,
            num_experts_per_tok=2, shared_intermediate_size=64)),
        # Mamba 2 beside the attention in every layer, muP multipliers (keys scaled by key_multiplier)
        "falcon-h1": lambda: t.FalconH1ForCausalLM(t.FalconH1Config(**common, **mamba2, mamba_d_ssm=128,
                                                                    key_multiplier=0.7)),
        "bamba": lambda: t.BambaForCausalLM(t.BambaConfig(**four, **mamba2, attn_layer_indices=[1, 3])),
        # Mamba (1) and attention without position embedding in turn, experts in the attention layers
        "jamba": lambda: t.JambaForCausalLM(t.JambaConfig(
            **four, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
            num_experts=4, mamba_d_state=16, mamba_expand=2, mamba_dt_rank=8)),
        # Kimi Linear: delta attention with a short convolution (at self_attn) and latent attention in turn, experts
        "kimi-linear": lambda: t.KimiLinearForCausalLM(t.KimiLinearConfig(
            **{**latent, "num_hidden_layers": 4, "q_lora_rank": None}, linear_head_dim=8, linear_num_heads=4,
            layer_types=["linear_attention", "full_attention"] * 2, num_local_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, bos_token_id=1, eos_token_id=2)),
        # one mixer per layer: Mamba 2 ("M"), attention without position embedding ("*") or experts alone ("E")
        "nemotron-h": lambda: t.NemotronHForCausalLM(t.NemotronHConfig(
            **{**common, "num_hidden_layers": 5}, hybrid_override_pattern="M*EM*", mamba_num_heads=4,
            mamba_head_dim=32, ssm_state_size=16, n_groups=1, expand=2, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, moe_shared_expert_intermediate_size=32)),
    }
    model = build[kind]()
    if kind in ("gemma3n", "gemma3n-vlm"):  # its layers' own inputs reach the next layers' attention through AltUp's
        with torch.no_grad():  # streams: a scale initialised at 0 and mixing weights near 0, made to matter here
            for layer in base_model(model).layers:
                layer.altup.correct_output_scale.normal_(1.0, 0.2)
                layer.altup.prediction_coefs.weight.normal_(0.0, 0.5)
    if kind == "gpt-oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


def tiny(kind: str, attn: str = "sdpa", *, layers: int = 2, sliding_window: int | None = None, seed: int = 0):
    """A tiny model of ``kind``; Gemma 3 alternates sliding (window 8 unless given) and global layers.

    ``mixtral`` and ``qwen3-moe``: mixtures of 4 experts, 2 per token, under Mistral's and Qwen 3's attention;
    ``smollm3``: every second layer without a position embedding (NoPE), as SmolLM3 has;
    ``phi3``: Phi-3's fused ``qkv_proj``, rotating half of each head (Phi-4-mini's partial RoPE);
    ``gemma3-vlm``: ``Gemma3ForConditionalGeneration``, the same text model under a one-layer SigLIP
    tower (image token 96; an image is 4 tokens); :data:`MORE_KINDS`: see :func:`_more` (a class without an
    SDPA path, gpt-oss and Gemma 2 after transformers 5.2, runs eager whatever ``attn`` says);
    :data:`MROPE_KINDS`: see :func:`_mrope`."""
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
    elif kind in MROPE_KINDS:
        model = _mrope(kind, common)
    elif kind in MORE_KINDS + HYBRID_KINDS + OWN_TEST_KINDS:
        if too_old(kind):
            import pytest

            pytest.skip(f"transformers {transformers.__version__}: the presses take {NEWER[kind][0]} from "
                        f"{NEWER[kind][1]} on")
        model = _more(kind, common, sliding_window)
        attn = attn if getattr(model, "_supports_sdpa", True) else "eager"  # gpt-oss; Gemma 2 from 5.2x on
    else:
        raise ValueError(kind)
    if kind == "gemma3n-vlm":  # its timm tower takes no SDPA under transformers 5.2: set the decoder's alone
        attn = {"text_config": attn, "vision_config": "eager", "audio_config": "eager"}
    model.set_attn_implementation(attn)
    return model.eval()


def duplicated_cache(cache):
    """A plain cache in which every merged entry appears ``size`` times.

    Softmax over s identical keys equals one key with ``+log(s)`` on its logit, so an
    unpatched model decoding on this cache computes exactly what proportional attention
    should: an oracle built without any of the press's hooks.
    """
    ref = copy.deepcopy(cache)
    for i, layer in enumerate(ref.layers):
        if not is_merged(layer):
            continue
        hkv = layer.keys.shape[1]
        groups = layer.log_sizes.shape[1] // hkv
        sizes = layer.log_sizes[:, ::groups, 0, :].exp().round().long()  # [B, Hkv, K]
        decoded = layer.keys.shape[2] - sizes.shape[-1]  # entries appended since the last merge stand for one token
        sizes = torch.cat([sizes, sizes.new_ones(*sizes.shape[:2], decoded)], dim=-1)
        keys = torch.stack([torch.stack([torch.repeat_interleave(layer.keys[b, h], sizes[b, h], dim=0)
                                         for h in range(hkv)]) for b in range(sizes.shape[0])])
        values = torch.stack([torch.stack([torch.repeat_interleave(layer.values[b, h], sizes[b, h], dim=0)
                                           for h in range(hkv)]) for b in range(sizes.shape[0])])
        kind = type(layer).__mro__[1]  # the layer class the press merged (Falcon-H1's also holds a Mamba state)
        plain = kind.__new__(kind)
        plain.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in ("log_sizes", "positions")})
        plain.keys, plain.values = keys, values
        ref.layers[i] = plain
    return ref


@torch.no_grad()
def press_and_oracle(model, ids, cont, prompt=None, *, new_cache=None, decode=None, ratios=(0.0, 0.5)):
    """``cont`` decoded after a prefill of ``ids`` (with the model's other prompt inputs ``prompt``: pixels, ...):
    unpatched, and for each ratio inside ``QuickMergePress(ratio, window=4)`` and on that cache's duplicated-cache
    oracle. Returns ``reference, {ratio: (merged, oracle, cache)}`` (logits, and the merged cache after decoding).
    ``new_cache`` makes each cache (default ``DynamicCache()``), ``decode(model, cont, cache)`` decodes (default one
    call). The prompt runs once more unpatched before the oracle decodes: multimodal RoPE models keep the prompt's
    position shift on the model."""
    from quickmerge.text import QuickMergePress

    prompt, new_cache = prompt or {}, new_cache or transformers.DynamicCache
    decode = decode or (lambda model, cont, cache: model(cont, **cache_kwargs(model, cache)).logits)
    plain = new_cache()
    model(ids, **prompt, **cache_kwargs(model, plain))
    reference, runs = decode(model, cont, plain), {}
    for ratio in ratios:
        cache = new_cache()
        with QuickMergePress(ratio, window=4)(model):
            model(ids, **prompt, **cache_kwargs(model, cache))
            oracle = duplicated_cache(cache)
            merged = decode(model, cont, cache)
        model(ids, **prompt, **cache_kwargs(model, new_cache()))
        runs[ratio] = (merged, decode(model, cont, oracle), cache)
    return reference, runs


@torch.no_grad()
def one_at_a_time(model, ids, cache, **kwargs):
    """Logits of ``ids [B, T]`` decoded one token per call (each call trivially sees the whole cache)."""
    steps = [model(ids[:, t : t + 1], **cache_kwargs(model, cache), **kwargs).logits for t in range(ids.shape[1])]
    return torch.cat(steps, 1)


@torch.no_grad()
def greedy_loop(model, ids, steps: int):
    """``ids [B, T]`` followed by ``steps`` greedy tokens, decoded one per call on a fresh ``DynamicCache`` (what
    ``generate(do_sample=False)`` should give): ``(tokens [B, T + steps], cache)``."""
    cache, tokens = transformers.DynamicCache(), ids
    logits = model(ids, **cache_kwargs(model, cache)).logits
    for _ in range(steps):
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], 1)
        logits = model(nxt, **cache_kwargs(model, cache)).logits
    return tokens, cache
