"""Which methods the text-protocol plot names, and that it draws one PNG from a summary."""

from __future__ import annotations

import pytest

from quickmerge.eval.text import highlighted_methods, plot_text_eval

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def _row(method: str, ratio: float, value: float, saved: float | None = None) -> dict:
    return {"method": method, "compression_ratio": ratio, "ratio_to_uncompressed": value,
            "ratio_to_uncompressed_ci95": [value - 0.01, value + 0.01],
            "memory_saved": ratio if saved is None else saved}


ROWS = [
    _row("quickmerge", 0.5, 1.05), _row("quickmerge", 0.75, 1.20),
    _row("quickmerge-frame", 0.5, 1.02), _row("quickmerge-frame", 0.75, 1.30),
    _row("tome-kv", 0.5, 1.01), _row("tome-kv", 0.75, 1.01),  # a baseline, never "ours"
    _row("random", 0.5, 1.3), _row("random", 0.75, 1.6),
    _row("kvpress-kvzip", 0.5, 1.01, saved=0.0), _row("kvpress-kvzip", 0.75, 1.10, saved=0.0),
    _row("kvpress-snapkv", 0.5, 1.04), _row("kvpress-snapkv", 0.75, 1.25),
    _row("kvpress-knorm", 0.5, 1.5), _row("kvpress-knorm", 0.75, 2.0),
]


def test_names_our_default_our_best_kvpress_best_and_best_that_frees_memory():
    names = highlighted_methods(ROWS)
    assert names == ["quickmerge", "quickmerge-frame", "kvpress-kvzip", "kvpress-snapkv", "random"]
    assert "tome-kv" not in names and "kvpress-knorm" not in names


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    plot_text_eval({"summary": [{"method": "none", "compression_ratio": None}, *ROWS]}, str(path), "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
