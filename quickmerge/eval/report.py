"""Writing an evaluation's results: one JSON with the numbers, one PNG with the plot."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._cache import write_text_atomic


def write_report(results: dict[str, Any], out: str | Path, plot: Callable[[str], None]) -> tuple[Path, Path]:
    """Write ``results`` to ``<out>.json`` and ``plot(path)`` to ``<out>.png``; returns both paths.

    The JSON is written to a temporary file and renamed, so a reader never sees half of it.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    write_text_atomic(json_path, json.dumps(results, indent=2))
    plot(str(png_path))
    return json_path, png_path
