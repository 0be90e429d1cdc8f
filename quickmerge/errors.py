"""Errors the ``quickmerge`` command reports as one line (what is missing and how to get it)."""

from __future__ import annotations


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the pip extra that provides it."""


class IncompatibleExtraError(MissingExtraError):
    """An optional dependency is installed, in a release that does not support an installed library's release."""


class MissingDataError(FileNotFoundError):
    """A data set or model file is not where it should be; the message says how to install it."""


class UsageError(ValueError):
    """A command's arguments are refused before any work; ``quickmerge`` prints the message the way argparse
    prints its own refusals (``quickmerge eval text: error: ...``) and exits with status 2."""
