"""Token merging inside vision transformers: ``patch``/``unpatch``, per-block merging, schedules, adapters."""

from .patch import MergeHandle, get_handle, patch, unpatch

__all__ = ["MergeHandle", "get_handle", "patch", "unpatch"]
