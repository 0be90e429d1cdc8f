"""Token merging inside vision transformers: ``patch``/``unpatch``, per-block merging, schedules, adapters."""

from .patch import MergeHandle, get_handle, patch, unpatch
from .token_scorer import TokenScorer

__all__ = ["MergeHandle", "TokenScorer", "get_handle", "patch", "unpatch"]
