"""Tiny random-weight vision-language models for the press tests: the LLaVA family, PaliGemma, Idefics3 / SmolVLM,
InternVL and Aya Vision, each a one-layer vision tower over a three-layer decoder of :data:`tests.text.tiny.COMMON`'s
sizes, and a prompt whose image (or video) tokens the tower's features fill."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers

from quickmerge.text.decoder import base_model
from tests.text.tiny import COMMON

IMAGE = 96  # the image (LLaVA-NeXT-Video: video) token of every kind; text ids stay below 90
TOWER = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, patch_size=8)


@dataclass
class VisionLanguage:
    """A tiny model, how many image tokens one image makes, and the image inputs of a batch (``pixels(batch,
    generator)``: the keyword arguments the model takes beside the token ids)."""

    model: transformers.PreTrainedModel
    image_tokens: int
    pixels: Callable[[int, torch.Generator], dict]


def _text(kind: str) -> dict:
    common = {**COMMON, "num_hidden_layers": 3}
    if kind == "qwen2":
        return transformers.Qwen2Config(**common).to_dict()
    if kind == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16).to_dict()
    if kind == "gemma2":  # PaliGemma 2: sliding and global layers in turn, logits capped
        return transformers.Gemma2Config(**common, head_dim=16, sliding_window=8).to_dict()
    if kind == "cohere2":  # Aya Vision's decoder: sliding layers with a global one, as Command R7B's
        return transformers.Cohere2Config(**common, sliding_window=8, layer_types=[
            "sliding_attention", "sliding_attention", "full_attention"]).to_dict()
    return transformers.LlamaConfig(**common).to_dict()


def _images(*shape: int) -> Callable[[int, torch.Generator], dict]:
    return lambda batch, g: {"pixel_values": torch.randn(batch, *shape, generator=g)}


def _anyres(name: str) -> Callable[[int, torch.Generator], dict]:
    """LLaVA-NeXT's and OneVision's inputs: the base image and one crop of a 16 x 16 image, and its size."""
    def pixels(batch: int, g: torch.Generator) -> dict:
        return {name: torch.randn(batch, 2, 3, 16, 16, generator=g), "image_sizes": torch.tensor([[16, 16]] * batch)}

    return pixels


def _paligemma_pixels(batch: int, g: torch.Generator) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}  # token types: see :func:`prompt`


def vision_language(kind: str, attn: str = "sdpa") -> VisionLanguage:
    """A tiny model of ``kind`` (:data:`KINDS`) with ``attn`` in its decoder and tower (a decoder without an SDPA
    path, PaliGemma 2's Gemma 2 on newer transformers, runs eager whatever ``attn`` says)."""
    t = transformers
    torch.manual_seed(0)
    clip = t.CLIPVisionConfig(**TOWER, image_size=16).to_dict()
    siglip = dict(**TOWER, image_size=16)
    llava = dict(text_config=_text("llama"), vision_feature_layer=-1, vision_feature_select_strategy="default")
    if kind == "llava":  # LLaVA 1.5: a 16 x 16 image is 4 patches, the class token dropped
        built = VisionLanguage(t.LlavaForConditionalGeneration(t.LlavaConfig(
            vision_config=clip, image_token_index=IMAGE, **llava)), 4, _images(3, 16, 16))
    elif kind == "llava-next":  # base image + one crop, 4 patches each, a newline token after the crop's row pair
        built = VisionLanguage(t.LlavaNextForConditionalGeneration(t.LlavaNextConfig(
            vision_config=clip, image_token_index=IMAGE, image_grid_pinpoints=[[16, 16]], **llava)), 10,
            _anyres("pixel_values"))
    elif kind == "llava-next-video":  # three frames of 4 patches each (no pooling), the video token in the prompt
        built = VisionLanguage(t.LlavaNextVideoForConditionalGeneration(t.LlavaNextVideoConfig(
            vision_config=clip, image_token_index=95, video_token_index=IMAGE, image_grid_pinpoints=[[16, 16]],
            spatial_pool_stride=1, **llava)), 12, lambda batch, g: {
                "pixel_values_videos": torch.randn(batch, 3, 3, 16, 16, generator=g)})
    elif kind == "llava-onevision":  # SigLIP tower, Qwen 2 decoder; base image + crop, class token kept
        built = VisionLanguage(t.LlavaOnevisionForConditionalGeneration(t.LlavaOnevisionConfig(
            vision_config=siglip, text_config=_text("qwen2"), image_token_index=IMAGE, vision_feature_layer=-1,
            vision_feature_select_strategy="full", image_grid_pinpoints=[[16, 16]])), 10, _anyres("pixel_values"))
    elif kind == "llava-onevision-video":  # a clip of 3 frames, 16 patches each pooled 2 x 2, then a newline: 13
        built = VisionLanguage(t.LlavaOnevisionForConditionalGeneration(t.LlavaOnevisionConfig(
            vision_config=dict(**TOWER, image_size=32), text_config=_text("qwen2"), image_token_index=95,
            video_token_index=IMAGE, vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=[[32, 32]])), 13, lambda batch, g: {
                "pixel_values_videos": torch.randn(batch, 3, 3, 32, 32, generator=g)})
    elif kind in ("paligemma", "paligemma2"):
        text = _text("gemma" if kind == "paligemma" else "gemma2")
        built = VisionLanguage(t.PaliGemmaForConditionalGeneration(t.PaliGemmaConfig(
            vision_config=siglip, text_config=text, image_token_index=IMAGE, projection_dim=64)), 4,
            _paligemma_pixels)
    elif kind in ("idefics3", "smolvlm"):  # a 32 x 32 image: 16 patches, pixel-shuffled 2 x 2 into 4 tokens
        config, cls = ((t.Idefics3Config, t.Idefics3ForConditionalGeneration) if kind == "idefics3"
                       else (t.SmolVLMConfig, t.SmolVLMForConditionalGeneration))
        built = VisionLanguage(cls(config(vision_config=dict(**TOWER, image_size=32), text_config=_text("llama"),
                                          image_token_id=IMAGE, scale_factor=2)), 4, _images(1, 3, 32, 32))
    elif kind == "internvl":  # 16 patches, pixel-shuffled into 4 tokens; Qwen 2 decoder (InternVL 2.5 / 3)
        built = VisionLanguage(t.InternVLForConditionalGeneration(t.InternVLConfig(
            vision_config=dict(**{**TOWER, "patch_size": [8, 8]}, image_size=[32, 32]), text_config=_text("qwen2"),
            image_token_id=IMAGE, downsample_ratio=0.5)), 4, _images(3, 32, 32))
    elif kind == "aya-vision":  # SigLIP tower, 16 patches pixel-shuffled into 4 tokens, Cohere 2 decoder
        built = VisionLanguage(t.AyaVisionForConditionalGeneration(t.AyaVisionConfig(
            vision_config=dict(**TOWER, image_size=32), text_config=_text("cohere2"), image_token_index=IMAGE,
            downsample_factor=2)), 4, _images(3, 32, 32))
    else:
        raise ValueError(kind)
    if not getattr(base_model(built.model), "_supports_sdpa", True):  # Gemma 2 from transformers 5.2x: eager only
        attn = {"text_config": "eager", "vision_config": attn}
    built.model.set_attn_implementation(attn)
    built.model.eval()
    return built


KINDS = ("llava", "llava-next", "llava-next-video", "llava-onevision", "llava-onevision-video", "paligemma",
         "paligemma2", "idefics3", "smolvlm", "internvl", "aya-vision")


def prompt(built: VisionLanguage, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Token ids ``[batch, 30 + image_tokens]``: 5 text tokens, the image's tokens, 25 more; and the image inputs
    (PaliGemma's ``token_type_ids`` too: the whole prompt is its prefix)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 90, (batch, 30), generator=g)
    ids = torch.cat([text[:, :5], torch.full((batch, built.image_tokens), IMAGE), text[:, 5:]], 1)
    inputs = built.pixels(batch, g)
    if isinstance(built.model, transformers.PaliGemmaForConditionalGeneration):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return ids, inputs
