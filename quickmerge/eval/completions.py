"""Pictures of completions under compression (``quickmerge visualize image-ar`` / ``video-ar``).

For a few held-out images (or clips), the ground truth next to the completion generated from
the full context, from QuickMerge++'s compressed context and from the best kvpress press's
at the same ratios (the best by the evaluation's JSON, when given; left out, with a warning, where
kvpress is not installed or does not support the installed transformers). Images: the top rows are
the context, the rows below the red line are generated. Video: the three context frames,
then the true fourth frame and each method's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from .._optional import require
from .text import NO_COMPRESSION, TextExample, generate_continuation


def best_kvpress(results_path: str | Path | None, ratio: float, fallback: str) -> str:
    """The kvpress method with the lowest perplexity ratio at ``ratio`` in an eval JSON, else ``fallback``."""
    if results_path is None or not Path(results_path).is_file():
        return fallback
    rows = [r for r in json.loads(Path(results_path).read_text())["summary"]
            if r["method"].startswith("kvpress-") and r["compression_ratio"] == ratio]
    return min(rows, key=lambda r: r["ratio_to_uncompressed"])["method"] if rows else fallback


def completions(
    model: Any, fmt: Any, tokenizer: Any, examples: list[TextExample], columns: list[tuple[str, float | None]],
    *, sample: bool = False, seed: int = 0,
) -> torch.Tensor:
    """uint8 frames ``[E, len(columns), frames, H, W]``: context + each method's generated continuation."""
    from ..ar.formats import to_pixels
    from .generative_cli import ar_method

    out = []
    for example in examples:
        per_method = []
        for name, ratio in columns:
            method = NO_COMPRESSION if ratio is None else ar_method(name, fmt)
            press = None if ratio is None else method.make(ratio)
            gen = torch.Generator().manual_seed(seed)
            tail = generate_continuation(model, example, fmt.context, fmt.continuation, press, method,
                                         sample=sample, generator=gen)
            ids = torch.cat([example.ids[1 : fmt.context + 1], tail])  # without BOS: every pixel token
            per_method.append(to_pixels(ids[None], fmt, tokenizer)[0])
        out.append(torch.stack(per_method))
    return torch.stack(out)


def draw(frames: torch.Tensor, truth: torch.Tensor, fmt: Any, labels: list[str], titles: list[str],
         path: str | Path) -> Path:
    """Grid: a row per example; truth first, then each column's completion (video: context frames first)."""
    matplotlib = require("matplotlib", "plot", "Drawing completions")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e, m = frames.shape[:2]
    video = fmt.frames > 1
    lead = fmt.context_frames if video else 0
    cols = lead + 1 + m
    fig, axes = plt.subplots(e, cols, figsize=(1.3 * cols, 1.4 * e + 0.6), squeeze=False)
    for i in range(e):
        panels = [truth[i, f] for f in range(lead)] + [truth[i, -1]] + [frames[i, j, -1] for j in range(m)]
        names = [f"context {f + 1}" for f in range(lead)] + ["truth"] + labels
        for j, (ax, panel) in enumerate(zip(axes[i], panels, strict=True)):
            ax.imshow(panel.numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if not video and j >= lead:
                ax.axhline(fmt.context_rows - 0.5, color="red", linewidth=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=7)
        axes[i, 0].set_ylabel(titles[i][:18], fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


# The QuickMerge++ configuration drawn by default: the best of each modality's evaluation (BENCHMARKS.md)
DEFAULT_METHOD = {"image": "quickmerge-replay-row", "video": "quickmerge-replay-proportional"}


def run(modality: str, *, model_dir: str, count: int, ratios: list[float], results: str | None, out: str,
        sample: bool, video: str | None = None, method: str | None = None) -> Path:
    """Generate and draw ``count`` held-out examples for ``modality`` under ``method`` (an eval method name of
    QuickMerge++, default :data:`DEFAULT_METHOD`) and the best kvpress press; returns the PNG path."""
    from ..ar.formats import to_pixels
    from ..pretrained.ar_models import load_ar
    from .generative import image_examples, video_examples
    from .text_methods import kvpress_available, kvpress_incompatibility, kvpress_usable

    model, tokenizer, fmt = load_ar(model_dir)
    examples = (image_examples(fmt, tokenizer, count) if modality == "image"
                else video_examples(fmt, tokenizer, count, video))
    ours = method or DEFAULT_METHOD[modality]
    with_kvpress = kvpress_usable()
    if not with_kvpress:
        why = kvpress_incompatibility() if kvpress_available() else "kvpress is not installed (pip install kvpress)"
        warnings.warn(f"drawn without kvpress's columns: {why}", stacklevel=2)
    columns: list[tuple[str, float | None]] = [("full context", None)]
    for r in ratios:
        columns += [(ours, r)] + ([(best_kvpress(results, r, "kvpress-expected-attention"), r)] if with_kvpress else [])
    labels = ["full"] + [f"QuickMerge++ {r:g}" if n == ours else f"{n.removeprefix('kvpress-')} {r:g}"
                         for n, r in columns[1:]]
    frames = completions(model, fmt, tokenizer, examples, columns, sample=sample)
    truth = torch.stack([to_pixels(ex.ids[None, 1:], fmt, tokenizer)[0] for ex in examples])
    return draw(frames, truth, fmt, labels, [ex.title for ex in examples], out)
