"""quickmerge: QuickMerge++ token merging for transformers (text, vision, video).

The QuickMerge++ specification's API:
    QuickMergePP, EntropyAwareSaliency, DifferentiableTokenMerging,
    BidirectionalARAlignment, NormBasedFidelityConstraint, quickmerge_inference.
Causal LMs (Hugging Face transformers), used like kvpress presses (``with press(model):``):
    QuickMergePress (merges the KV cache), QuickMergeInputPress (merges the prompt's hidden
    states after one decoder layer), ToMeKVPress and RandomEvictionPress (baselines), and
    KVPress, the base a new press subclasses.
Vision transformers (timm, Hugging Face), used like ToMe:
    handle = quickmerge.patch(model, r=16); quickmerge.unpatch(model).
Optional dependencies (transformers, timm, kvpress, ...) are imported only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names below, for type checkers; at run time each is imported on first use
    from .budget import adaptive_tokens, tokens_for_budget
    from .fidelity import NormBasedFidelityConstraint
    from .merging import DifferentiableTokenMerging, MergeResult
    from .pipeline import QuickMergeOutput, QuickMergePP, quickmerge_inference
    from .prior import BidirectionalARAlignment, CausalPrior
    from .saliency import EntropyAwareSaliency, attention_entropy, qk_attention_entropy, saliency_from_attentions
    from .text import KVPress, QuickMergeInputPress, QuickMergePress, RandomEvictionPress, ToMeKVPress
    from .vision import MergeHandle, patch, unpatch

# public name -> the submodule defining it: ``import quickmerge`` (and the ``quickmerge`` command's parser) imports
# no torch until a name is used
_SOURCES = {
    **dict.fromkeys(("adaptive_tokens", "tokens_for_budget"), ".budget"),
    "NormBasedFidelityConstraint": ".fidelity",
    **dict.fromkeys(("DifferentiableTokenMerging", "MergeResult"), ".merging"),
    **dict.fromkeys(("QuickMergeOutput", "QuickMergePP", "quickmerge_inference"), ".pipeline"),
    **dict.fromkeys(("BidirectionalARAlignment", "CausalPrior"), ".prior"),
    **dict.fromkeys(("EntropyAwareSaliency", "attention_entropy", "qk_attention_entropy", "saliency_from_attentions"),
                    ".saliency"),
    **dict.fromkeys(("KVPress", "QuickMergeInputPress", "QuickMergePress", "RandomEvictionPress", "ToMeKVPress"),
                    ".text"),
    **dict.fromkeys(("MergeHandle", "patch", "unpatch"), ".vision"),
}


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'quickmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_SOURCES[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})


__version__ = "0.1.0"

__all__ = [
    "BidirectionalARAlignment",
    "CausalPrior",
    "DifferentiableTokenMerging",
    "EntropyAwareSaliency",
    "KVPress",
    "MergeHandle",
    "MergeResult",
    "NormBasedFidelityConstraint",
    "QuickMergeInputPress",
    "QuickMergeOutput",
    "QuickMergePP",
    "QuickMergePress",
    "RandomEvictionPress",
    "ToMeKVPress",
    "adaptive_tokens",
    "attention_entropy",
    "patch",
    "qk_attention_entropy",
    "quickmerge_inference",
    "saliency_from_attentions",
    "tokens_for_budget",
    "unpatch",
]
