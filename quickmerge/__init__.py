"""quickmerge: QuickMerge++ token merging for transformers (text, vision, video).

Public API (the QuickMerge++ specification):
    QuickMergePP, EntropyAwareSaliency, DifferentiableTokenMerging,
    BidirectionalARAlignment, NormBasedFidelityConstraint, quickmerge_inference.
Vision transformers: quickmerge.patch(model, r=16) / quickmerge.unpatch(model).
"""

from .budget import adaptive_tokens, tokens_for_budget
from .fidelity import NormBasedFidelityConstraint
from .merging import DifferentiableTokenMerging, MergeResult
from .pipeline import QuickMergeOutput, QuickMergePP, quickmerge_inference
from .prior import BidirectionalARAlignment, CausalPrior
from .saliency import EntropyAwareSaliency, attention_entropy, qk_attention_entropy, saliency_from_attentions
from .vision import MergeHandle, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "BidirectionalARAlignment",
    "CausalPrior",
    "DifferentiableTokenMerging",
    "EntropyAwareSaliency",
    "MergeHandle",
    "MergeResult",
    "NormBasedFidelityConstraint",
    "QuickMergeOutput",
    "QuickMergePP",
    "adaptive_tokens",
    "attention_entropy",
    "patch",
    "qk_attention_entropy",
    "quickmerge_inference",
    "saliency_from_attentions",
    "tokens_for_budget",
    "unpatch",
]
