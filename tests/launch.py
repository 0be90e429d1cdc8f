"""Helpers for tests that start ``torchrun``."""

LAUNCHER = "torch/distributed/elastic/"


def rank_errors(stderr: str, limit: int = 3000) -> str:
    """What the ranks themselves printed to stderr, without the launcher's own traceback (which would
    fill a truncated assertion message and hide the cause)."""
    own = [line for line in stderr.splitlines() if LAUNCHER not in line]
    cut = next((i for i, line in enumerate(own) if line.startswith("Traceback") and i + 3 < len(own)
                and "torch.distributed.run" in "".join(own[i:i + 8])), len(own))
    return "\n".join(own[:cut])[-limit:]
