"""A module's call argument by name, passed by keyword or by position: what forward pre-hooks read and replace.

Used by the text input press (a decoder layer's ``position_embeddings`` and ``per_layer_input``) and by the vision
adapters (a RoPE ViT block's rotary table, SigLIP 2's padding masks). A hook that may run under ``torch.compile``
takes a :class:`CallArgument` made when it is registered: the signature is read then, not while tracing."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class CallArgument:
    """The argument ``name`` of a module's forward and its place among the positional ones (``slot``; None: none)."""

    name: str
    slot: int | None

    @staticmethod
    def of(module: nn.Module, name: str) -> CallArgument:
        return _call_argument(type(module), name)

    def get(self, args: tuple, kwargs: dict) -> Any:
        """The value the call passed, by keyword or by position (None: not given)."""
        if self.name in kwargs:
            return kwargs[self.name]
        return args[self.slot] if self.slot is not None and len(args) > self.slot else None

    def replace(self, args: tuple, kwargs: dict, value: Any) -> tuple:
        """``args`` with the argument set to ``value`` where the call passed it (a keyword, or not given: in
        ``kwargs``, changed in place)."""
        if self.name in kwargs or self.slot is None or len(args) <= self.slot:
            kwargs[self.name] = value
            return args
        return (*args[: self.slot], value, *args[self.slot + 1 :])


@functools.cache
def _call_argument(module_type: type, name: str) -> CallArgument:
    names = [n for n in inspect.signature(module_type.forward).parameters if n != "self"]
    return CallArgument(name, names.index(name) if name in names else None)


def takes_argument(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s forward takes an argument ``name``."""
    return name in inspect.signature(module.forward).parameters


def layer_argument(block: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """The argument ``name`` a module was called with, by keyword or by position (None: not given)."""
    return CallArgument.of(block, name).get(args, kwargs)


def with_layer_argument(block: nn.Module, args: tuple, kwargs: dict, name: str, value: Any) -> tuple:
    """``args`` with the argument ``name`` set to ``value`` where the call passed it (a keyword: in ``kwargs``)."""
    return CallArgument.of(block, name).replace(args, kwargs, value)
