"""QuickMerge++ end to end: saliency -> selection -> merging -> losses, and left-to-right inference."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import ValueChecks, check_num_tokens, check_positive_int, check_real, check_scores, check_tokens
from .budget import adaptive_tokens, tokens_for_budget
from .fidelity import NormBasedFidelityConstraint
from .merging import DifferentiableTokenMerging, MergeResult
from .prior import BidirectionalARAlignment
from .saliency import EntropyAwareSaliency, Salient


class QuickMergeOutput(tuple):
    """``(merged [B, K, D], losses)`` as the spec returns it, plus ``.merge`` (a
    :class:`MergeResult` with assignment, sizes, positions) and ``.saliency [B, N]``."""

    merge: MergeResult
    saliency: Tensor

    def __new__(cls, merged: Tensor, losses: dict[str, Tensor], merge: MergeResult, saliency: Tensor):
        self = super().__new__(cls, (merged, losses))
        self.merge, self.saliency = merge, saliency
        return self


class QuickMergePP(nn.Module):
    """QuickMerge++ token compression.

    Args:
        embedding_dim: D of the tokens.
        num_layers: L, layers of the X-only saliency estimator.
        temperature: Gumbel-softmax temperature tau, in (0, 100].
        gamma: norm-mass retention ratio of the fidelity constraint, in [0, 1].
        epsilon: merge mass of unselected (background) tokens, in (0, 1].
        alpha: weight of the AR alignment loss, >= 0.
        causal: order-preserving merging (contiguous spans) for causal sequences.
        kmeans_iters: centre updates of the cosine k-means.
        saliency_weight: causal mode, how strongly spans break around salient tokens.
        prior_dim, prior_layers, prior_heads: size of each AR prior.
        salient: which end of the entropy scale counts as salient.

    ``forward(X [B, N, D], K)`` returns ``(merged [B, K, D], losses)`` with
    ``losses`` a dict of scalar tensors: ``ar_forward``, ``ar_backward``, ``ar``
    (their sum, L_AR), ``fidelity`` and ``total = alpha * ar + fidelity``. Pass
    real per-layer ``attentions`` (``[B, H, N, N]`` each) or precomputed
    ``saliency [B, N]`` to use a model's own attention.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_layers: int = 12,
        temperature: float = 0.1,
        gamma: float = 0.8,
        epsilon: float = 0.1,
        alpha: float = 1.0,
        *,
        causal: bool = False,
        kmeans_iters: int = 2,
        saliency_weight: float = 1.0,
        prior_dim: int = 64,
        prior_layers: int = 2,
        prior_heads: int = 4,
        salient: Salient = "low_entropy",
    ) -> None:
        super().__init__()
        self.embedding_dim = check_positive_int(embedding_dim, "embedding_dim")
        self.alpha = check_real(alpha, "alpha", low=0.0, high=float("inf"), low_open=False, high_open=True)
        self.saliency = EntropyAwareSaliency(embedding_dim, num_layers, salient=salient)
        self.merger = DifferentiableTokenMerging(
            temperature, epsilon, causal=causal, kmeans_iters=kmeans_iters, saliency_weight=saliency_weight
        )
        self.ar_alignment = BidirectionalARAlignment(embedding_dim, prior_dim, prior_layers, prior_heads)
        self.fidelity = NormBasedFidelityConstraint(gamma)

    def compress(
        self,
        X: Tensor,
        K: int,
        *,
        attentions: Iterable[Tensor] | None = None,
        saliency: Tensor | None = None,
    ) -> tuple[MergeResult, Tensor]:
        """Saliency and merge without losses: ``(MergeResult, saliency [B, N])``."""
        checks = ValueChecks()
        check_tokens(X, "X", dim=self.embedding_dim, checks=checks)
        b, n, _ = X.shape
        k = check_num_tokens(K, n)
        if saliency is not None and attentions is not None:
            raise ValueError("pass either attentions or saliency, not both")
        if saliency is not None:
            check_scores(saliency, "saliency", b, n, nonnegative=True, checks=checks)
        checks.resolve()
        return self._compress(X, k, attentions, saliency)

    def _compress(
        self, X: Tensor, k: int, attentions: Iterable[Tensor] | None, saliency: Tensor | None
    ) -> tuple[MergeResult, Tensor]:
        if saliency is None:
            saliency = self.saliency.estimate(X, attentions)
        return self.merger.merge(X, saliency, k), saliency

    def forward(
        self,
        X: Tensor,
        K: int,
        *,
        attentions: Iterable[Tensor] | None = None,
        saliency: Tensor | None = None,
    ) -> QuickMergeOutput:
        result, s = self.compress(X, K, attentions=attentions, saliency=saliency)
        merged = result.merged
        l_fwd, l_bwd = self.ar_alignment.losses(merged)
        fidelity = self.fidelity.unchecked_loss(X, merged, result.sizes)
        ar = l_fwd + l_bwd
        losses = {
            "ar_forward": l_fwd,
            "ar_backward": l_bwd,
            "ar": ar,
            "fidelity": fidelity,
            "total": self.alpha * ar + fidelity,
        }
        return QuickMergeOutput(merged, losses, result, s)


def _call_ar_model(ar_model: Callable[..., Any], tokens: Tensor) -> Tensor:
    """One causal pass of ``ar_model`` over ``tokens [1, K, D]``; returns its per-position output."""
    forward = getattr(ar_model, "forward", ar_model)
    try:
        takes_embeds = "inputs_embeds" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        takes_embeds = False
    out = ar_model(inputs_embeds=tokens) if takes_embeds else ar_model(tokens)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"ar_model must return a tensor (or an object with .logits), got {type(out).__name__}")
    return out


def quickmerge_inference(
    X_single: Tensor,
    ar_model: Callable[..., Any],
    entropy_budget: float = 0.2,
    *,
    quickmerge: QuickMergePP | None = None,
    attentions: Iterable[Tensor] | None = None,
    saliency: Tensor | None = None,
    adaptive: bool = False,
) -> tuple[Tensor, Tensor]:
    """Compress one sequence and decode left to right over the result.

    Keeps ``K = max(1, round(N * entropy_budget))`` tokens (with ``adaptive=True``,
    the entropy-based budget of :func:`quickmerge.budget.adaptive_tokens`, never
    more), merged in order-preserving mode so they form a valid causal prefix,
    then runs ``ar_model`` once, causally, over the merged sequence.

    Args:
        X_single: ``[N, D]`` token embeddings.
        ar_model: a causal model called once on ``[1, K, D]`` (as
            ``ar_model(inputs_embeds=...)`` if its forward takes that keyword,
            else ``ar_model(tokens)``); output ``t`` must depend on tokens ``<= t``.
        entropy_budget: keep share in (0, 1].
        quickmerge: the compressor to use; default a fresh causal ``QuickMergePP``.
        attentions / saliency: real attention (per layer ``[1, H, N, N]``) or
            saliency ``[1, N]`` for the saliency step.
    Returns:
        ``(merged [K, D], predictions [K, ...])``, predictions[t] being the model's
        output after the first t + 1 merged tokens.
    """
    check_tokens(X_single, "X_single", rank=2)
    if not callable(ar_model):
        raise TypeError(f"ar_model must be callable, got {type(ar_model).__name__}")
    n, d = X_single.shape
    k = tokens_for_budget(n, entropy_budget)
    if quickmerge is None:
        quickmerge = QuickMergePP(d, causal=True)
    elif not isinstance(quickmerge, QuickMergePP):
        raise TypeError(f"quickmerge must be a QuickMergePP, got {type(quickmerge).__name__}")
    elif not quickmerge.merger.causal:
        raise ValueError("quickmerge must be built with causal=True so the merged tokens form a left-to-right prefix")
    quickmerge = quickmerge.to(X_single.device)
    X = X_single[None]
    was_training = quickmerge.training
    quickmerge.eval()
    try:
        with torch.no_grad():
            if saliency is None:
                saliency = quickmerge.saliency.estimate(X, attentions)
            else:
                check_scores(saliency, "saliency", 1, n, nonnegative=True)
            if adaptive:
                k = int(adaptive_tokens(saliency, entropy_budget)[0])
            result = quickmerge.merger.merge(X, saliency, check_num_tokens(k, n))
            predictions = _call_ar_model(ar_model, result.merged)
    finally:
        quickmerge.train(was_training)
    check_num_tokens(k, n)
    if predictions.dim() < 2 or predictions.shape[:2] != (1, k):
        raise ValueError(f"ar_model must return [1, K={k}, ...] for input [1, K, D], got {tuple(predictions.shape)}")
    return result.merged[0], predictions[0]
