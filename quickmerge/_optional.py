"""Lazy imports of optional extras with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError telling the user which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"{purpose} needs the '{module}' package, which is not installed: pip install 'quickmerge[{extra}]'"
        ) from err
