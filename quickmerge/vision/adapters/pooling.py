"""What the adapters share for heads that pool the last block's tokens.

A head that averages the output tokens should average over the patches they stand for
(:func:`mean_by_size`); an attention-pooling head should see each token as ``size`` copies
(:func:`size_bias`, proportional attention). Both use the sizes of the last pass only for the
tensor that pass's final norm returned (:class:`LastOutput`), never for other features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...primitives import weighted_mean
from .protocol import BlockMerger


class LastOutput:
    """Forward hook keeping the latest output of ``module`` in ``tensor`` (and its first input in ``input``);
    ``remove()`` takes it off."""

    def __init__(self, module: nn.Module) -> None:
        self.tensor: Tensor | None = None
        self.input: Tensor | None = None
        self._hook = module.register_forward_hook(self._keep)

    def _keep(self, _m: nn.Module, args: tuple, out: Tensor) -> None:
        self.tensor, self.input = out, args[0] if args else None

    def remove(self) -> None:
        self._hook.remove()
        self.tensor = self.input = None


def pools_own_streams(merger: BlockMerger) -> bool:
    """Whether a head that norms every token before averaging them reads each patch's own residual stream this
    pass (``unmerge="residual"``, ``size_weighted_pool``): not where the method drops tokens, whose patches have no
    stream left (the size-weighted mean leaves them out). A head averaging the stream itself needs none of it: a
    merge weighs its tokens by size, so their size-weighted mean is the mean of the patches' streams."""
    return merger.unmerge == "residual" and merger.size_weighted_pool and not merger.drops()


def mean_by_size(x: Tensor, sizes: Tensor) -> Tensor:
    """``[B, N, C]`` tokens, ``[B, N]`` sizes -> ``[B, C]`` size-weighted mean (accumulated in float32 or wider)."""
    one_group = torch.zeros(sizes.shape, dtype=torch.long, device=x.device)
    return weighted_mean(x, sizes, one_group, 1)[0][:, 0]


def size_bias(sizes: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention mask ``[B, 1, 1, N]`` = log(size), for keys of ``[B, N]`` sizes (proportional
    attention, in the blocks and in attention-pooling heads)."""
    return sizes.log().to(dtype)[:, None, None, :]
