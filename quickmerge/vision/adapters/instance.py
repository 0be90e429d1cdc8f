"""Per-instance replacements of a model's methods, removed by deleting the instance attribute."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .protocol import BlockMerger


class InstanceMethod:
    """Sets ``model.<name>`` to ``function`` on the instance (the class is left alone); ``remove`` deletes it."""

    def __init__(self, model: nn.Module, name: str, function: Any) -> None:
        self.model, self.name, self.function = model, name, function
        setattr(model, name, function)

    def remove(self) -> None:
        if self.model.__dict__.get(self.name) is self.function:
            del self.model.__dict__[self.name]


class FeatureMaps(InstanceMethod):
    """Per instance: ``model.forward_intermediates(output_fmt="NCHW")`` puts merged tokens back on the patch grid.

    timm and OpenCLIP reshape each block's patch tokens ``[B, H*W, C]`` into a map ``[B, C, H, W]``, which merged
    tokens no longer fill. While the handle merges, the call runs with ``output_fmt="NLC"`` (the model's own
    code, every other argument as given) and each intermediate is unmerged before that same reshape, at the
    block whose output has the intermediate's token count (every merge removes tokens): with the handle's
    ``unmerge="residual"`` (default) every patch takes the token it was merged into plus what its own residual
    stream lost at each merge before (``expand_to_patches(..., residual=True)``; an intermediate asked normed is
    taken un-normed and normed after, prefix tokens with it, as the model's code would); with ``"copy"`` the
    token alone, so a map's mean over its positions is the size-weighted mean of the block's tokens. The final
    features and every output structure (lists, ``(features, list)``, ``(map, prefix)`` pairs, dicts) are the
    model's own. ``grid(height, width)`` is the family's patch grid ``(H, W)`` for an input image; ``norm`` the
    call's argument that norms the intermediates and the model's module that does it; ``refuse(arguments)``, if
    given, runs first in every call while the handle merges (it raises for calls the family cannot unmerge)."""

    def __init__(self, model: nn.Module, merger: BlockMerger, grid: Callable[[int, int], tuple[int, int]],
                 norm: tuple[str, Callable[[], nn.Module]],
                 refuse: Callable[[inspect.BoundArguments], None] | None = None) -> None:
        original = model.forward_intermediates
        signature = inspect.signature(original)
        norm_argument, norm_module = norm

        @functools.wraps(original)
        def forward_intermediates(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if refuse is not None and merger.merges():
                refuse(bound)
            if bound.arguments.get("output_fmt") != "NCHW" or not merger.merges():
                return original(*args, **kwargs)
            images = next(iter(bound.arguments.values()))
            bound.arguments["output_fmt"] = "NLC"
            residual = merger.unmerge == "residual"
            post = norm_module() if residual and bound.arguments.get(norm_argument) else None
            if post is not None:
                bound.arguments[norm_argument] = False  # the residual goes into the stream, before the norm
            reader = merger.dense_head() if residual else None
            try:
                out = original(*bound.args, **bound.kwargs)
            finally:
                if reader is not None:
                    reader.remove()
            merger.end_open_pass()  # stop_early: the blocks after the last intermediate did not run
            height, width = grid(int(images.shape[-2]), int(images.shape[-1]))
            normed = (lambda t: t) if post is None else post

            def on_grid(item: Any) -> Any:
                if isinstance(item, tuple):  # (patch tokens, prefix tokens)
                    return (on_grid(item[0]), normed(item[1]), *item[2:])
                return _feature_map(merger, item, height, width, residual, normed)

            if isinstance(out, dict):
                out = {**out, "image_intermediates": [on_grid(y) for y in out["image_intermediates"]]}
                if "image_intermediates_prefix" in out:
                    out["image_intermediates_prefix"] = [normed(t) for t in out["image_intermediates_prefix"]]
                return out
            if isinstance(out, tuple):  # (final features, intermediates)
                return (out[0], [on_grid(y) for y in out[1]], *out[2:])
            return [on_grid(y) for y in out]

        super().__init__(model, "forward_intermediates", forward_intermediates)


def _feature_map(merger: BlockMerger, tokens: Tensor, height: int, width: int, residual: bool,
                 norm: Callable[[Tensor], Tensor]) -> Tensor:
    """One block's patch tokens ``[B, n, C]`` (prefix tokens cut off) of the last pass as a map ``[B, C, H, W]``,
    ``norm`` applied after the unmerge."""
    b, n, c = tokens.shape
    p = merger.num_prefix_tokens
    if merger.sizes is not None:  # the pass merged: find the stage with n patch tokens, unmerge there
        counts = [*merger.tokens_per_layer, merger.sizes.shape[1]]
        if n + p not in counts:
            raise RuntimeError(f"an intermediate with {n} patch tokens matches no block of the last pass "
                               f"({[k - p for k in counts]} patch tokens entering each block, then the output)")
        stage = counts.index(n + p)
        full = merger.expand_to_patches(torch.cat([tokens.new_zeros(b, p, c), tokens], dim=1), stage, residual)
        tokens = full[:, p:]
    tokens = norm(tokens)
    if tokens.shape[1] != height * width:
        raise RuntimeError(f"{tokens.shape[1]} patch tokens do not fill a {height} x {width} patch grid")
    return tokens.reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous()
