"""Model families that :func:`quickmerge.patch` supports: the adapter registry.

An adapter (see :class:`VisionAdapter` in :mod:`.protocol`) knows one family's blocks and
where to hook them. ``patch`` asks the adapters of :data:`REGISTRY` in order; the first
whose ``matches(model)`` is true patches it. Adding a family is one module with one
adapter class, registered here (or at run time with :func:`register_adapter`).
"""

from __future__ import annotations

import difflib

from torch import nn

from .hf_aimv2 import HFAimv2Adapter
from .hf_blip import HFBlipAdapter
from .hf_clip import HFCLIPAdapter
from .hf_vit import HFViTAdapter
from .openclip_vit import OpenCLIPViTAdapter
from .pooling import mean_by_size, size_bias
from .protocol import BlockMerger, Removable, VisionAdapter
from .timm_eva import TimmEvaAdapter
from .timm_naflex import TimmNaFlexVitAdapter
from .timm_vit import TimmViTAdapter
from .torchvision_vit import TorchvisionViTAdapter

REGISTRY: list[VisionAdapter] = [TimmViTAdapter(), TimmEvaAdapter(), TimmNaFlexVitAdapter(), HFViTAdapter(),
                                 HFCLIPAdapter(), HFBlipAdapter(), HFAimv2Adapter(), OpenCLIPViTAdapter(),
                                 TorchvisionViTAdapter()]


def register_adapter(adapter: VisionAdapter) -> None:
    """Add ``adapter`` in front of the registry (it is asked first)."""
    for attr in ("name", "tested_classes", "matches", "num_prefix_tokens", "has_class_token",
                 "gradient_checkpointing", "blocks", "attach"):
        if not hasattr(adapter, attr):
            raise TypeError(f"a vision adapter needs {attr!r} (see quickmerge.vision.adapters.VisionAdapter)")
    REGISTRY.insert(0, adapter)


def find_adapter(model: nn.Module) -> VisionAdapter | None:
    """The first registered adapter that matches ``model``, or None."""
    return next((adapter for adapter in REGISTRY if adapter.matches(model)), None)


def supported_families() -> str:
    """The registered families and their tested classes (the whole list; messages point to it)."""
    return "; ".join(f"{a.name} ({', '.join(a.tested_classes)})" for a in REGISTRY)


def family_hint(model: nn.Module, adapter: VisionAdapter | None = None) -> str:
    """Where the tested classes are listed, and those nearest ``model``'s class: a tested class it subclasses,
    else the tested names closest to its own (for warnings and refusals; the whole list is long). Among
    ``adapter``'s tested classes, or every family's without one."""
    cls = type(model)
    families = REGISTRY if adapter is None else [adapter]
    tested = list(dict.fromkeys(name for a in families for name in a.tested_classes))  # two families share names
    where = "listed by quickmerge.vision.adapters.supported_families()"
    base = next((b.__name__ for b in cls.__mro__[1:] if b.__name__ in tested), None)
    if base is not None:
        return f"{where}; {cls.__name__} subclasses {base}, a tested class"
    if cls.__name__ in tested:  # another library's class of a tested name (three families have a VisionTransformer)
        owners = [a.name for a in families if cls.__name__ in a.tested_classes]
        owners = ", ".join(owners[:-1]) + " and " + owners[-1] if len(owners) > 1 else owners[0]
        return f"{where}; the {cls.__name__} tested is that of {owners} (not {cls.__module__})"
    near = difflib.get_close_matches(cls.__name__, tested, n=3, cutoff=0.6)
    return where + (f"; nearest by name: {', '.join(near)}" if near else "")


__all__ = [
    "REGISTRY",
    "BlockMerger",
    "HFAimv2Adapter",
    "HFBlipAdapter",
    "HFCLIPAdapter",
    "HFViTAdapter",
    "OpenCLIPViTAdapter",
    "Removable",
    "TimmEvaAdapter",
    "TimmNaFlexVitAdapter",
    "TimmViTAdapter",
    "TorchvisionViTAdapter",
    "VisionAdapter",
    "family_hint",
    "find_adapter",
    "mean_by_size",
    "register_adapter",
    "size_bias",
    "supported_families",
]
