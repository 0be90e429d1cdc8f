"""A module's call argument by name, passed by keyword or by position: what forward pre-hooks read and replace.

Used by the text input press (a decoder layer's ``position_embeddings`` and ``per_layer_input``) and by the vision
adapters (a RoPE ViT block's rotary table)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.cache
def _slot(module_type: type, name: str) -> int | None:
    """Where ``module_type.forward`` takes the argument ``name`` among its positional ones, or None."""
    names = [n for n in inspect.signature(module_type.forward).parameters if n != "self"]
    return names.index(name) if name in names else None


def takes_argument(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s forward takes an argument ``name``."""
    return name in inspect.signature(module.forward).parameters


def layer_argument(block: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """The argument ``name`` a module was called with, by keyword or by position (None: not given)."""
    if name in kwargs:
        return kwargs[name]
    slot = _slot(type(block), name)
    return args[slot] if slot is not None and len(args) > slot else None


def with_layer_argument(block: nn.Module, args: tuple, kwargs: dict, name: str, value: Any) -> tuple:
    """``args`` with the argument ``name`` set to ``value`` where the call passed it (a keyword: in ``kwargs``)."""
    slot = _slot(type(block), name)
    if name in kwargs or slot is None or len(args) <= slot:
        kwargs[name] = value
        return args
    return (*args[:slot], value, *args[slot + 1 :])
