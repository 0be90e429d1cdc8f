"""Step 2: a relaxed K-hot Gumbel-softmax mask over N tokens.

The mask solves the entropy-regularised top-K problem

    mask = argmax_{m in [0,1]^N, sum(m) = K}  <m, z> + tau * sum_i H_b(m_i)

whose solution is ``mask_i = sigmoid((z_i - t) / tau)`` with the threshold t
chosen so that the mask sums to exactly K. As ``tau -> 0`` it becomes the hard
top-K indicator. The logits are ``z_i = log s_i + g_i`` with Gumbel noise
``g_i`` in training, so the perturbed top-K is a sample of K tokens without
replacement with probabilities proportional to saliency (the Gumbel-top-k
trick); in eval mode there is no noise and the mask is the hard top-K of s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .primitives import top_indices

_BISECTION_STEPS = 40
_SUM_TOLERANCE = 1e-5  # |sum - K| at which the threshold search stops


def gumbel_noise(shape: torch.Size, *, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel(0, 1) samples of ``shape`` on ``like``'s device, in float32.

    With a ``generator`` the uniforms are drawn on its device and moved, so a seed gives the
    same noise whichever device the model runs on (a CPU generator serves a CUDA model).
    """
    device = like.device if generator is None else generator.device
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator).to(like.device)
    return -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))


def relaxed_topk_mask(logits: Tensor, k: int, temperature: float) -> Tensor:
    """Relaxed K-hot mask ``[B, N]`` in (0, 1) summing to ``k`` along N.

    The threshold is found by bisection without gradient; its gradient is put
    back by the implicit-function theorem (dt/dz_j = w_j, w = sigmoid' / sum
    sigmoid'), so the mask's Jacobian keeps the sum fixed at K.
    """
    z = logits.float()
    n = z.shape[-1]
    if k >= n:
        return torch.ones_like(z)
    # Centred at the K-th largest score, the scores near the threshold are small numbers, which
    # float32 resolves finely whatever their magnitude (19999.998 - 20000 is exact).
    z = z - z.detach().topk(k, dim=-1).values[..., -1:]
    with torch.no_grad():
        lo = z.amin(dim=-1, keepdim=True) - 40.0 * temperature
        hi = z.amax(dim=-1, keepdim=True) + 40.0 * temperature
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            total = torch.sigmoid((z - mid) / temperature).sum(dim=-1, keepdim=True)
            # A root stops its row's search: widely gapped scores give a flat stretch where the sum is
            # exactly K, and bisecting on through it ends at its edge, where a score far from the centre
            # sits within float32's resolution of the threshold (and counts 0.5).
            hit, too_many = (total - k).abs() <= _SUM_TOLERANCE, total > k
            lo = torch.where(hit | too_many, mid, lo)
            hi = torch.where(hit | ~too_many, mid, hi)
        t = 0.5 * (lo + hi)
        # One Newton step polishes the rows still short of the tolerance; it may not leave the bracket (a
        # row that hit the tolerance has a bracket of width 0), where a flat stretch would send it far off.
        sig = torch.sigmoid((z - t) / temperature)
        slope = (sig * (1 - sig)).sum(dim=-1, keepdim=True) / temperature
        t = torch.minimum(torch.maximum(t + (sig.sum(dim=-1, keepdim=True) - k) / slope.clamp_min(1e-12), lo), hi)
        sig = torch.sigmoid((z - t) / temperature)
        weight = sig * (1 - sig)
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    if z.requires_grad:
        t = t + (weight * (z - z.detach())).sum(dim=-1, keepdim=True)
    return torch.sigmoid((z - t) / temperature)


def select_tokens(
    saliency: Tensor,
    k: int,
    *,
    temperature: float,
    floor: float,
    training: bool,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Choose K seed tokens and a selection mask from saliency.

    Args:
        saliency: ``[B, N]`` non-negative scores.
        k: number of tokens to select.
        temperature: tau of the relaxation.
        floor: scores are clamped to at least this value before the log.
        training: sample with Gumbel noise and return the relaxed mask; else the
            deterministic hard top-K mask.
    Returns:
        ``mask [B, N]`` (float32, sums to K) and ``seeds [B, K]`` (token indices in
        increasing order).
    """
    logits = saliency.float().clamp_min(floor).log()
    if training:
        logits = logits + gumbel_noise(logits.shape, like=logits, generator=generator)
        mask = relaxed_topk_mask(logits, k, temperature)
        seeds = top_indices(logits.detach(), k)
    else:
        seeds = top_indices(logits, k)
        mask = torch.zeros_like(logits).scatter_(-1, seeds, 1.0)
    return mask, seeds.sort(dim=-1).values
