"""What the benchmark scripts share to report a result: the command line that produced it and the PNG figure."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def command_line(script: str, args: argparse.Namespace) -> str:
    """``python benchmarks/<script> --flag value ...`` for every argument given a value (lists space-separated)."""
    flags = (f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in vars(args).items() if v is not None)
    return f"python benchmarks/{script} " + " ".join(flags)


def figure(columns: int = 2, size: tuple[float, float] = (10, 4)) -> tuple[Any, Any]:
    """A matplotlib figure and its row of ``columns`` axes, drawn off-screen (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=size)


def save_figure(fig: Any, axes: Any, path: Path, legend_fontsize: int = 8) -> None:
    """Grid every axis, put the legend on the first, and write the figure to ``path`` (PNG, 120 dpi)."""
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=legend_fontsize)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def interval_line(ax: Any, xs: list[float], values: list[tuple[float, float, float]], label: str,
                  scale: float = 1.0) -> None:
    """One line of ``(mean, low, high)`` values against ``xs``, the 95% interval as error bars, scaled by ``scale``."""
    ax.errorbar(xs, [scale * v[0] for v in values],
                yerr=[[scale * (v[0] - v[1]) for v in values], [scale * (v[2] - v[0]) for v in values]],
                marker="o", capsize=3, label=label)
