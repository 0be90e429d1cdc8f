"""The methods ``quickmerge eval text`` compares: ours, in-framework baselines, and kvpress's presses."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

from ..errors import MissingExtraError
from ..text import QuickMergeInputPress, QuickMergePress, RandomEvictionPress, ToMeKVPress
from .text import Method

OURS = ["quickmerge", "quickmerge-input", "quickmerge-uniform", "quickmerge-high-entropy", "tome-kv", "random"]
KVPRESS = [
    "kvpress-knorm",
    "kvpress-snapkv",
    "kvpress-expected-attention",
    "kvpress-streaming-llm",
    "kvpress-tova",
    "kvpress-observed-attention",
    "kvpress-keydiff",
    "kvpress-merging-snapkv",
]


def kvpress_available() -> bool:
    return importlib.util.find_spec("kvpress") is not None


def build_method(name: str) -> Method:
    """The :class:`Method` of a name in ``OURS + KVPRESS``."""
    if name == "quickmerge":
        return Method(name, lambda r: QuickMergePress(compression_ratio=r), decode_inside=True)
    if name == "quickmerge-input":
        return Method(name, lambda r: QuickMergeInputPress(compression_ratio=r), decode_inside=True)
    if name == "quickmerge-uniform":  # ablation: window queries weighted equally
        return Method(name, lambda r: QuickMergePress(compression_ratio=r, salient="uniform"), decode_inside=True)
    if name == "quickmerge-high-entropy":  # ablation: broad-attention queries weighted more
        return Method(name, lambda r: QuickMergePress(compression_ratio=r, salient="high_entropy"), decode_inside=True)
    if name == "tome-kv":
        return Method(name, lambda r: ToMeKVPress(compression_ratio=r), decode_inside=True)
    if name == "random":
        return Method(name, lambda r: RandomEvictionPress(compression_ratio=r), decode_inside=True)
    if name not in KVPRESS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(OURS + KVPRESS)}")
    if not kvpress_available():
        raise MissingExtraError(f"method {name} runs NVIDIA kvpress, which is not installed: pip install kvpress")
    import kvpress

    presses = {
        "kvpress-knorm": lambda r: kvpress.KnormPress(compression_ratio=r),
        "kvpress-snapkv": lambda r: kvpress.SnapKVPress(compression_ratio=r),
        "kvpress-expected-attention": lambda r: kvpress.ExpectedAttentionPress(compression_ratio=r),
        "kvpress-streaming-llm": lambda r: kvpress.StreamingLLMPress(compression_ratio=r),
        "kvpress-tova": lambda r: kvpress.TOVAPress(compression_ratio=r),
        "kvpress-observed-attention": lambda r: kvpress.ObservedAttentionPress(compression_ratio=r),
        "kvpress-keydiff": lambda r: kvpress.KeyDiffPress(compression_ratio=r),
        "kvpress-merging-snapkv": lambda r: kvpress.MergingPress(press=kvpress.SnapKVPress(compression_ratio=r)),
    }
    make = presses[name]
    return Method(name, lambda r: global_rope_default(global_layers_only(make(r))),
                  eager=name == "kvpress-observed-attention")


def global_rope_default(press: Any) -> Any:
    """Let kvpress call Gemma 3's rotary embedding without a layer type (ExpectedAttention).

    kvpress 0.5.5 calls ``rotary_emb(x, position_ids)``; Gemma 3's per-layer-type rotary
    embedding in transformers 5 then looks up ``None_inv_freq`` and fails. While the press
    is active, the global layers' RoPE (the only layers compressed) answers for ``None``.
    """

    @contextlib.contextmanager
    def apply(model: Any) -> Iterator[None]:
        added = []
        for module in model.modules():
            if hasattr(module, "full_attention_inv_freq") and not hasattr(module, "None_inv_freq"):
                module.None_inv_freq = module.full_attention_inv_freq
                module.None_attention_scaling = module.full_attention_attention_scaling
                added.append(module)
        try:
            with press(model):
                yield
        finally:
            for module in added:
                del module.None_inv_freq, module.None_attention_scaling

    return apply


def global_layers_only(press: Any) -> Any:
    """Make a kvpress press leave sliding-window attention layers alone (Gemma 3).

    kvpress 0.5.5 skips Gemma 3's sliding-window layers only for
    ``Gemma3ForConditionalGeneration``; on ``Gemma3ForCausalLM`` it compresses them too and
    breaks their cache (perplexity x22 on Gemma-3-270m). This applies kvpress's own rule to
    every model; layers without ``is_sliding`` (Llama, Qwen, ...) are unaffected.
    """
    hook = press.forward_hook

    def forward_hook(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        if getattr(module, "is_sliding", False):
            return output
        return hook(module, args, kwargs, output)

    press.forward_hook = forward_hook
    return press


def default_methods() -> list[str]:
    """Every method that can run here: ours always, kvpress's when it is installed."""
    return OURS + (KVPRESS if kvpress_available() else [])
