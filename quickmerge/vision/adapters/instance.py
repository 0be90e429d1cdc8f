"""Per-instance replacements of a model's methods, removed by deleting the instance attribute."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from .protocol import BlockMerger


class InstanceMethod:
    """Sets ``model.<name>`` to ``function`` on the instance (the class is left alone); ``remove`` deletes it."""

    def __init__(self, model: nn.Module, name: str, function: Any) -> None:
        self.model, self.name, self.function = model, name, function
        setattr(model, name, function)

    def remove(self) -> None:
        if self.model.__dict__.get(self.name) is self.function:
            del self.model.__dict__[self.name]


class GridGuard(InstanceMethod):
    """Per instance: ``model.forward_intermediates`` refuses ``output_fmt="NCHW"`` while tokens merge.

    timm and OpenCLIP reshape each block's tokens to ``[B, C, H, W]`` with ``reshape(B, H, W, -1)``: merged
    tokens would come back as a map of the wrong width (no error). The class's method is left alone; the
    guard is an instance attribute, deleted on removal. ``also`` names the family's other way to the NLC
    format, for the error message."""

    def __init__(self, model: nn.Module, merger: BlockMerger, also: str | None = None) -> None:
        original = model.forward_intermediates
        signature = inspect.signature(original)

        @functools.wraps(original)
        def forward_intermediates(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if bound.arguments.get("output_fmt") == "NCHW" and merger.merges():
                raise ValueError(
                    f"{type(model).__name__}.forward_intermediates(output_fmt='NCHW') puts every patch token back on "
                    "the grid, but this model is patched to merge tokens (quickmerge.patch): set handle.r = 0 while "
                    "taking feature maps, or pass output_fmt='NLC'" + (f" ({also})" if also else "")
                    + " for each block's merged tokens")
            return original(*args, **kwargs)

        super().__init__(model, "forward_intermediates", forward_intermediates)
