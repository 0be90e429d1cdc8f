"""The methods ``quickmerge eval text`` compares: ours, in-framework baselines, and kvpress's presses."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from typing import Any

from .._optional import kvpress_incompatibility
from ..errors import IncompatibleExtraError, MissingExtraError
from ..text import QuickMergeInputPress, QuickMergePress, RandomEvictionPress, ToMeKVPress
from .text import Method

REPLAY = dict(scoring="replay", budget="replay", head_budgets=True, proportional=False)
REPLAY_PROPORTIONAL = {**REPLAY, "proportional": True}
RECENT = dict(window=2, kernel_size=1, salient="uniform", proportional=False)
PROMPT_LIGHT = dict(scoring="prompt", kernel_size=1, proportional=False, epsilon=0.005)
# Our presses: the method, its ablations (each QuickMerge++ ingredient on and off), baselines.
OURS_PRESSES: dict[str, Any] = {
    "quickmerge": lambda r: QuickMergePress(compression_ratio=r),
    "quickmerge-budget": lambda r: QuickMergePress(compression_ratio=r, budget="entropy"),
    "quickmerge-align": lambda r: QuickMergePress(compression_ratio=r, align=True),
    "quickmerge-budget-align": lambda r: QuickMergePress(compression_ratio=r, budget="entropy", align=True),
    "quickmerge-novelty": lambda r: QuickMergePress(compression_ratio=r, novelty=1.0),
    # every prompt query scores the entries (entropy-weighted, ObservedAttention's normalisation), for Gemma 3:
    # the defaults otherwise (best on development windows 40..59), and a light merge without pooling or
    # proportional attention (best on 40..79; docs/results/issue10/gemma_prompt_dev.json)
    "quickmerge-prompt": lambda r: QuickMergePress(compression_ratio=r, scoring="prompt"),
    "quickmerge-prompt-light": lambda r: QuickMergePress(r, **PROMPT_LIGHT),
    # the same with per-layer budgets from the window's attention entropy (QuickMerge++'s budget; best on
    # development windows 40..79 at 0.5, docs/results/issue10/gemma_budget_dev.json)
    "quickmerge-prompt-budget": lambda r: QuickMergePress(r, **PROMPT_LIGHT, budget="entropy"),
    # replay scoring (the model reads the prompt again), budgets over layers and KV heads, flat cache
    "quickmerge-replay": lambda r: QuickMergePress(compression_ratio=r, **REPLAY),
    "quickmerge-replay-proportional": lambda r: QuickMergePress(r, **REPLAY_PROPORTIONAL),
    "quickmerge-replay-drop": lambda r: QuickMergePress(compression_ratio=r, **REPLAY, epsilon=1e-6),  # evict
    "quickmerge-replay-even-heads": lambda r: QuickMergePress(r, **{**REPLAY, "head_budgets": False}),
    # replay scores max-pooled over 9 neighbours: a kept fact keeps its sentence (passkey, BENCHMARKS.md; the
    # width chosen among 1 / 5 / 9 on development trials, docs/results/issue10/passkey_pooled_dev.json)
    "quickmerge-replay-pooled": lambda r: QuickMergePress(r, **REPLAY, replay_pool=9),
    # the same with a quarter of the even budget reserved for the keys of highest leverage (query-agnostic
    # outliers: a number in prose); the share chosen among 0 / 0.1 / 0.25 / 0.5 on development trials
    # (docs/results/issue10/passkey_leverage_dev.json)
    "quickmerge-replay-leverage": lambda r: QuickMergePress(r, **REPLAY, replay_pool=9, leverage=0.25),
    # ... with the leverage max-pooled over 9 first: the reserve keeps spans around the strongest outliers (22 of
    # 23 development trials at 0.75, docs/results/issue10/passkey_leverage_pool_dev.json); the retrieval
    # configuration the README recommends (0.90 of 93 evaluation trials at 0.75, passkey_gemma_once_spans_*.json)
    "quickmerge-replay-leverage-spans": lambda r: QuickMergePress(r, **REPLAY, replay_pool=9, leverage=0.25,
                                                                  leverage_pool=9),
    # Gemma 3 ablation: the last two queries' attention, evicting the rest (epsilon -> 0) or merging lightly;
    # best on development windows 40..45, behind the default on the 40 evaluation windows (BENCHMARKS.md)
    "quickmerge-window2-drop": lambda r: QuickMergePress(r, **RECENT, epsilon=1e-6),
    "quickmerge-window2": lambda r: QuickMergePress(r, **RECENT, epsilon=0.005),
    "quickmerge-uniform": lambda r: QuickMergePress(compression_ratio=r, salient="uniform"),
    "quickmerge-high-entropy": lambda r: QuickMergePress(compression_ratio=r, salient="high_entropy"),
    "quickmerge-no-proportional": lambda r: QuickMergePress(compression_ratio=r, proportional=False),
    "quickmerge-input": lambda r: QuickMergeInputPress(compression_ratio=r),
    "tome-kv": lambda r: ToMeKVPress(compression_ratio=r),
    "random": lambda r: RandomEvictionPress(compression_ratio=r),
}
OURS = list(OURS_PRESSES)


def _kvpress_presses() -> dict[str, tuple[Any, bool]]:
    """kvpress 0.5.5's presses that run offline on these models: ``name -> (make(ratio), masks)``.

    ``masks``: the press (AdaKV and its relatives) hides evicted keys inside attention instead of
    removing them, so the cache keeps its length and no memory is saved.
    """
    import kvpress as kp

    def ada(make: Any) -> tuple[Any, bool]:
        return make, True

    return {
        "kvpress-knorm": (lambda r: kp.KnormPress(compression_ratio=r), False),
        "kvpress-snapkv": (lambda r: kp.SnapKVPress(compression_ratio=r), False),
        "kvpress-expected-attention": (lambda r: kp.ExpectedAttentionPress(compression_ratio=r), False),
        "kvpress-streaming-llm": (lambda r: kp.StreamingLLMPress(compression_ratio=r), False),
        "kvpress-tova": (lambda r: kp.TOVAPress(compression_ratio=r), False),
        "kvpress-observed-attention": (lambda r: kp.ObservedAttentionPress(compression_ratio=r), False),
        "kvpress-keydiff": (lambda r: kp.KeyDiffPress(compression_ratio=r), False),
        "kvpress-lagkv": (lambda r: kp.LagKVPress(compression_ratio=r), False),
        "kvpress-cur": (lambda r: kp.CURPress(compression_ratio=r), False),
        "kvpress-leverage": (lambda r: kp.LeverageScorePress(compression_ratio=r), False),
        "kvpress-compactor": (lambda r: kp.CompactorPress(compression_ratio=r), False),
        "kvpress-cap": (lambda r: kp.CapPress(compression_ratio=r), False),
        "kvpress-pyramidkv": (lambda r: kp.PyramidKVPress(compression_ratio=r), False),
        "kvpress-kvzip": ada(lambda r: kp.KVzipPress(compression_ratio=r)),  # head-wise: masks like AdaKV
        "kvpress-chunkkv-snapkv": (lambda r: kp.ChunkKVPress(press=kp.SnapKVPress(compression_ratio=r)), False),
        "kvpress-merging-snapkv": (lambda r: kp.MergingPress(press=kp.SnapKVPress(compression_ratio=r)), False),
        "kvpress-merging-expected-attention": (
            lambda r: kp.MergingPress(press=kp.ExpectedAttentionPress(compression_ratio=r)), False),
        "kvpress-merging-knorm": (lambda r: kp.MergingPress(press=kp.KnormPress(compression_ratio=r)), False),
        "kvpress-merging-tova": (lambda r: kp.MergingPress(press=kp.TOVAPress(compression_ratio=r)), False),
        # kvpress's leaderboard setting of "expected_attention": head-wise adaptive budgets
        "kvpress-adakv-expected-attention": ada(
            lambda r: kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=r, epsilon=1e-2))),
        "kvpress-adakv-expected-attention-eps0": ada(
            lambda r: kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=r))),
        "kvpress-adakv-snapkv": ada(lambda r: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=r))),
        "kvpress-critical-adakv-expected-attention": ada(lambda r: kp.CriticalAdaKVPress(
            kp.ExpectedAttentionPress(compression_ratio=r, epsilon=1e-2, use_vnorm=False))),
        "kvpress-critical-adakv-snapkv": ada(lambda r: kp.CriticalAdaKVPress(kp.SnapKVPress(compression_ratio=r))),
    }


KVPRESS = [
    "kvpress-knorm", "kvpress-snapkv", "kvpress-expected-attention", "kvpress-streaming-llm", "kvpress-tova",
    "kvpress-observed-attention", "kvpress-keydiff", "kvpress-lagkv", "kvpress-cur", "kvpress-leverage",
    "kvpress-compactor", "kvpress-cap", "kvpress-pyramidkv", "kvpress-kvzip", "kvpress-chunkkv-snapkv",
    "kvpress-merging-snapkv", "kvpress-merging-expected-attention", "kvpress-merging-knorm", "kvpress-merging-tova",
    "kvpress-adakv-expected-attention", "kvpress-adakv-expected-attention-eps0", "kvpress-adakv-snapkv",
    "kvpress-critical-adakv-expected-attention", "kvpress-critical-adakv-snapkv",
]


def kvpress_available() -> bool:
    """Whether kvpress is installed (it may still not run: :func:`kvpress_incompatibility`)."""
    return importlib.util.find_spec("kvpress") is not None


def kvpress_usable() -> bool:
    """Whether kvpress is installed and supports the installed transformers."""
    return kvpress_available() and kvpress_incompatibility() is None


def build_method(name: str) -> Method:
    """The :class:`Method` of a name in ``OURS + KVPRESS``."""
    if name in OURS_PRESSES:
        return Method(name, OURS_PRESSES[name], decode_inside=True)
    if name not in KVPRESS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(OURS + KVPRESS)}")
    require_kvpress(f"method {name}")
    make, masks = _kvpress_presses()[name]
    quiet = logging.getLogger("kvpress")  # KVzipPress warns of its cost each time one is built
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        make(0.5)  # a press is a small dataclass: built once here, a press this kvpress lacks fails before any work
    except AttributeError as err:
        from importlib import metadata

        raise IncompatibleExtraError(f"method {name} needs a press that kvpress {metadata.version('kvpress')} does "
                                     f"not have ({err}): pip install -U 'kvpress>=0.5.4'") from err
    finally:
        quiet.setLevel(level)
    return Method(name, lambda r: global_rope_default(global_layers_only(make(r))),
                  eager=name == "kvpress-observed-attention", masks=masks)


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


def methods_refused(methods: list[Method], ratio: float, model: Any) -> dict[str, str]:
    """``{name: why}`` for the ``methods`` whose press refuses ``model`` as loaded (ours: its attention
    implementation, its depth; kvpress's run on the model's attention or switch it themselves)."""
    presses = [(m.name, m.make(ratio)) for m in methods if m.name in OURS_PRESSES]
    refusals = {name: press.refusal(model) for name, press in presses}
    return {name: why for name, why in refusals.items() if why is not None}


def require_kvpress(what: str) -> None:
    """Raise, naming ``what`` (``method kvpress-snapkv``), unless kvpress is installed and supports the installed
    transformers."""
    if not kvpress_available():
        raise MissingExtraError(f"{what} runs NVIDIA kvpress, which is not installed: pip install kvpress")
    if kvpress_incompatibility() is not None:
        raise IncompatibleExtraError(f"{what}: {kvpress_incompatibility()}")


def kvpress_for_defaults() -> bool:
    """Whether a protocol's default methods include kvpress's; a warning says why not when it is installed but
    does not support the installed transformers."""
    if kvpress_available() and kvpress_incompatibility() is not None:
        warnings.warn(f"kvpress's presses are left out: {kvpress_incompatibility()}", stacklevel=3)
    return kvpress_usable()


def default_methods() -> list[str]:
    """Every method that can run here: ours always, kvpress's when it is installed and supports the
    installed transformers (a warning says why they are left out when it does not)."""
    return OURS + (KVPRESS if kvpress_for_defaults() else [])
