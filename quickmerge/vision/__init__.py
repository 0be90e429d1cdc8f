"""Token merging inside vision transformers: ``patch``/``unpatch``, the reference ViT, its training."""

from .patch import MergeHandle, get_handle, patch, unpatch

__all__ = ["MergeHandle", "get_handle", "patch", "unpatch"]
