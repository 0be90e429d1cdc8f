"""Resumable training: the one checkpoint file a killed ``quickmerge train ...`` picks up from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def _state(obj: Any) -> Any:
    if obj is None:
        return None
    return obj.get_state() if isinstance(obj, torch.Generator) else obj.state_dict()


def save_training_state(path: Path, identity: dict, parts: dict[str, Any], **extra: Any) -> None:
    """Write ``parts``' states (modules, optimisers, schedulers, generators; None stays None), ``identity``
    (the configuration that must match to resume) and ``extra`` to ``path``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"identity": identity, **{name: _state(obj) for name, obj in parts.items()}, **extra}, tmp)
    tmp.replace(path)


def load_training_state(path: Path, identity: dict, parts: dict[str, Any], device: torch.device) -> dict | None:
    """Load the states saved at ``path`` into ``parts`` (None entries skipped); returns everything saved, or
    None when there is no checkpoint.

    Raises ValueError when the checkpoint was written by another configuration (``identity`` differs).
    """
    if not path.exists():
        return None
    state = torch.load(path, map_location=device, weights_only=False)
    if state["identity"] != identity:
        raise ValueError(f"{path} was written by another training configuration; rerun with --fresh")
    for name, obj in parts.items():
        if obj is None:
            continue
        if isinstance(obj, torch.Generator):
            obj.set_state(state[name])
        else:
            obj.load_state_dict(state[name])
    return state
