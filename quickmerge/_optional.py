"""Lazy imports of optional extras with an error that names the extra to install, and whether an
installed extra supports the other installed libraries."""

from __future__ import annotations

import functools
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


@functools.cache
def kvpress_incompatibility() -> str | None:
    """Why the installed kvpress cannot run beside the installed transformers, or None (also when either
    is not installed).

    kvpress declares the transformers releases it supports; outside them its presses fail inside the
    forward pass (kvpress 0.5.5 under transformers 5.24: ``KeyError: 'past_key_values'``, the decoder
    layers pass ``cache=`` there), so they are refused before any work."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requires, have = metadata.requires("kvpress") or [], metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
    for line in requires:
        requirement = Requirement(line)
        if requirement.name != "transformers" or requirement.marker is not None:
            continue
        if requirement.specifier.contains(have, prereleases=True):
            return None
        return (f"kvpress {metadata.version('kvpress')} supports transformers {requirement.specifier}, and "
                f"transformers {have} is installed: compare against kvpress in an environment with "
                f"pip install 'transformers{requirement.specifier}' (quickmerge's own presses run on both)")
    return None
