"""Norm-based fidelity: the merged sequence must retain a share gamma of the input's norm mass."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._validation import ValueChecks, check_real, check_tokens


class NormBasedFidelityConstraint(nn.Module):
    """Hinge penalty on lost token-norm mass.

    The norm mass of a sequence is ``sum_i ||x_i||``. The retention of a merge is

        rho = sum_k w_k ||x~_k|| / sum_i ||x_i||,   w_k = |G_k| (group sizes),

    For plain averages it is at most 1 by the triangle inequality, with
    equality exactly when each group's tokens point the same way: merging
    dissimilar tokens cancels mass. (A mass-weighted merge that favours
    high-norm tokens can retain more than 1.) Without ``sizes``, every group is taken to
    have N / K members, so rho is the ratio of mean token norms. The loss is
    ``mean_b max(0, gamma - rho_b)``: zero once a share gamma is retained.

    Args:
        gamma: required retention ratio, in [0, 1].
    """

    def __init__(self, gamma: float = 0.8) -> None:
        super().__init__()
        self.gamma = check_real(gamma, "gamma", low=0.0, high=1.0, low_open=False, high_open=False)

    def retention(self, X: Tensor, merged_tokens: Tensor, sizes: Tensor | None = None) -> Tensor:
        """Retention ratio rho ``[B]`` of ``merged_tokens [B, K, D]`` relative to ``X [B, N, D]``."""
        checks = ValueChecks()
        check_tokens(X, "X", checks=checks)
        check_tokens(merged_tokens, "merged_tokens", dim=X.shape[-1], checks=checks)
        checks.resolve()
        return self.unchecked_retention(X, merged_tokens, sizes)

    def unchecked_retention(self, X: Tensor, merged_tokens: Tensor, sizes: Tensor | None = None) -> Tensor:
        """:meth:`retention` without checking the tensors' values (for callers that checked them)."""
        b, n, _ = X.shape
        k = merged_tokens.shape[1]
        if merged_tokens.shape[0] != b:
            raise ValueError(f"merged_tokens must have batch size B={b}, got {merged_tokens.shape[0]}")
        merged_norms = merged_tokens.float().norm(dim=-1)  # [B, K]
        if sizes is None:
            kept = merged_norms.sum(dim=-1) * (n / k)
        else:
            if tuple(sizes.shape) != (b, k):
                raise ValueError(f"sizes must have shape [B, K] = [{b}, {k}], got {tuple(sizes.shape)}")
            kept = (merged_norms * sizes.to(merged_norms.dtype)).sum(dim=-1)
        total = X.float().norm(dim=-1).sum(dim=-1)
        return kept / total.clamp_min(torch.finfo(torch.float32).tiny)

    def compute_fidelity_loss(self, X: Tensor, merged_tokens: Tensor, sizes: Tensor | None = None) -> Tensor:
        """``mean_b relu(gamma - rho_b)``, a scalar tensor carrying gradients."""
        return torch.relu(self.gamma - self.retention(X, merged_tokens, sizes)).mean()

    def unchecked_loss(self, X: Tensor, merged_tokens: Tensor, sizes: Tensor | None = None) -> Tensor:
        """:meth:`compute_fidelity_loss` for tensors the caller checked."""
        return torch.relu(self.gamma - self.unchecked_retention(X, merged_tokens, sizes)).mean()

    forward = compute_fidelity_loss

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"
