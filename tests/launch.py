"""Helpers for tests that start ``torchrun``."""

LAUNCHER = "torch/distributed/elastic/"


def rank_errors(stderr: str, limit: int = 3000) -> str:
    """What the ranks printed to stderr before the launcher's first own line (its SIGTERM notice and traceback
    would fill a truncated assertion message and hide the cause)."""
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if LAUNCHER in line), len(lines))
    return "\n".join(lines[:first])[-limit:]
