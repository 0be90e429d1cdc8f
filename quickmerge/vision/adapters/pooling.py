"""What the adapters share for heads that pool the last block's tokens.

A head that averages the output tokens should average over the patches they stand for
(:func:`mean_by_size`); an attention-pooling head should see each token as ``size`` copies
(:func:`size_bias`, proportional attention). Both use the sizes of the last pass only for the
tensor that pass's final norm returned (:class:`LastOutput`), never for other features. A head that norms every
token and then averages them reads each patch's own residual stream instead (:class:`NormedStreams`), where
:func:`pools_own_streams`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ...primitives import weighted_mean
from .protocol import BlockMerger


class LastOutput:
    """Forward hook keeping the latest output of ``module`` in ``tensor`` (and its first input in ``input``, with
    ``keep_input``) until the end of ``owner``'s call, where the head that reads them runs; nothing is held between
    calls of ``owner`` (a head called on its own, e.g. timm's ``forward_head(forward_features(x))``, still finds the
    last pass's). ``remove()`` takes the hooks off."""

    def __init__(self, module: nn.Module, owner: nn.Module | None = None, keep_input: bool = True) -> None:
        self.tensor: Tensor | None = None
        self.input: Tensor | None = None
        self._keep_input = keep_input
        self._hooks = [module.register_forward_hook(self._keep)]
        if owner is not None:
            self._hooks.append(owner.register_forward_hook(lambda *_: self.release(), always_call=True))

    def _keep(self, _m: nn.Module, args: tuple, out: Tensor) -> None:
        self.tensor, self.input = out, args[0] if args and self._keep_input else None

    def release(self) -> None:
        self.tensor = self.input = None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.release()


def pools_own_streams(merger: BlockMerger) -> bool:
    """Whether a head that norms every token before averaging them reads each patch's own residual stream this
    pass (``unmerge="residual"``, ``size_weighted_pool``): not where the method drops tokens, whose patches have no
    stream left (the size-weighted mean leaves them out). A head averaging the stream itself needs none of it: a
    merge weighs its tokens by size, so their size-weighted mean is the mean of the patches' streams."""
    return merger.unmerge == "residual" and merger.size_weighted_pool and not merger.drops()


class NormedStreams:
    """Every patch's own residual stream, normed by the model's final ``norm``, for a head that norms every token
    and then averages them (timm's and OpenCLIP's average pooling after their final norm).

    A pre-hook on ``model`` opens a dense-head reader for the call (:meth:`BlockMerger.dense_head`: the pass keeps
    its deviations) where ``averages()`` says the head pools that way this call and :func:`pools_own_streams`; a
    hook after the call closes it, also after a raise. :meth:`patches` then gives ``norm`` run on
    ``expand_to_patches(<norm's input>, residual=True)`` ``[B, N0, C]``, for the tensor the pass's final norm
    returned, from any pass that kept its deviations (that call of the model; a feature-map call under the
    residual unmerge; any pass with the handle's ``keep_deviations``, so ``forward_head(forward_features(x))``
    too); ``None`` otherwise (copying, other features, a pass that kept nothing), where the head pools by size."""

    def __init__(self, model: nn.Module, norm: nn.Module, merger: BlockMerger, averages: Callable[[], bool]) -> None:
        self.final, self.norm, self.merger = LastOutput(norm, owner=model), norm, merger
        self._reader: Any = None

        def model_pre(_m: nn.Module, _args: tuple) -> None:
            if self._reader is None and not isinstance(norm, nn.Identity) and averages() \
                    and pools_own_streams(merger):
                self._reader = merger.dense_head()

        def model_post(_m: nn.Module, _args: tuple, _out: Any) -> None:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.remove()

        self._hooks = [model.register_forward_pre_hook(model_pre),
                       model.register_forward_hook(model_post, always_call=True)]

    def patches(self, x: Tensor) -> Tensor | None:
        if x is not self.final.tensor or isinstance(self.norm, nn.Identity) or not pools_own_streams(self.merger) \
                or not self.merger.kept_deviations():
            return None
        # the norm's module hooks bypassed: its LastOutput would take the expanded patches for the pass's output
        return self.norm.forward(self.merger.expand_to_patches(self.final.input, residual=True))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self.final.remove()


def mean_by_size(x: Tensor, sizes: Tensor) -> Tensor:
    """``[B, N, C]`` tokens, ``[B, N]`` sizes -> ``[B, C]`` size-weighted mean (accumulated in float32 or wider)."""
    one_group = torch.zeros(sizes.shape, dtype=torch.long, device=x.device)
    return weighted_mean(x, sizes, one_group, 1)[0][:, 0]


def size_bias(sizes: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention mask ``[B, 1, 1, N]`` = log(size), for keys of ``[B, N]`` sizes (proportional
    attention, in the blocks and in attention-pooling heads)."""
    return sizes.log().to(dtype)[:, None, None, :]


def pool_by_size(x: Tensor, weights: Tensor, kind: str, attn_pool: nn.Module | None = None) -> Tensor:
    """timm's pooling of merged tokens ``x [B, N, C]`` over the patches they stand for (``weights [B, N]``, sizes;
    0 for padding): an attention-pooling head with log(size) as its mask; else ``"avg"`` the size-weighted mean,
    ``"max"`` the largest over the tokens that stand for a patch, ``"avgmax"`` half of each."""
    if attn_pool is not None:
        return attn_pool(x, attn_mask=size_bias(weights, x.dtype))
    largest = x.masked_fill((weights == 0)[..., None], torch.finfo(x.dtype).min).amax(dim=1)
    if kind == "max":
        return largest
    mean = mean_by_size(x, weights)
    return mean if kind == "avg" else 0.5 * (largest + mean)
