"""Examples of ``quickmerge eval image`` / ``eval video``: token sequences of held-out pixels.

Each example is a :class:`~quickmerge.eval.text.TextExample` of ``fmt.length`` tokens
(context C, continuation T, last target), so the text harness scores them unchanged: the
context (the top rows of an image, the first frames of a clip) is prefilled under each
compression method, the continuation (the bottom rows, the next frame) is scored by
teacher forcing.
"""

from __future__ import annotations

import math
import os
from typing import Any

from .text import TextExample


def add_bits_per_token(rows: list[dict[str, Any]]) -> None:
    """Give each summary row ``bits_per_token``: its mean per-example NLL (``nll_per_example``, nats) in bits."""
    for row in rows:
        row["bits_per_token"] = sum(row["nll_per_example"]) / len(row["nll_per_example"]) / math.log(2)


def image_examples(fmt: Any, tokenizer: Any, count: int) -> list[TextExample]:
    """The first ``count`` Fashion-MNIST test images as sequences."""
    from ..ar.data import image_pixels
    from ..ar.formats import to_sequences

    pixels = image_pixels("test")
    if not 1 <= count <= len(pixels):
        raise ValueError(f"--examples must be between 1 and {len(pixels)} test images, got {count}")
    ids = to_sequences(pixels[:count], fmt, tokenizer)
    return [TextExample(f"fashion-test-{i}", row) for i, row in enumerate(ids)]


def video_examples(fmt: Any, tokenizer: Any, count: int | None, path: str | os.PathLike | None = None, *,
                   at_most: int | None = None) -> list[TextExample]:
    """``count`` non-overlapping windows of ``fmt.frames`` frames as sequences.

    Default: held-out frames of the training clips and held-out Moving Fashion-MNIST
    sequences, taken in turn from each source; with ``path``: the windows of that clip
    (``count=None``: all of them, the first ``at_most`` if given).
    """
    from ..ar.data import Clip, interleave_sources, video_clips, video_windows
    from ..ar.formats import to_sequences
    from ..data.video import read_clip

    if path is not None:
        from pathlib import Path

        clips = [Clip(Path(path).name, read_clip(path, fmt.height))]
    else:
        clips = video_clips("heldout", fmt)
    windows, names = video_windows(clips, fmt)
    if count is None:
        if path is None:
            raise ValueError("count=None (every window) needs a clip path")
        count = len(windows) if at_most is None else min(len(windows), at_most)
        if count == 0:
            raise ValueError(f"{path} holds no window of {fmt.frames} frames")
    if path is not None:
        if count > len(windows):
            raise ValueError(f"{path} holds {len(windows)} windows of {fmt.frames} frames, asked for {count}")
        order = list(range(count))
    else:
        order = interleave_sources(names, count)
    ids = to_sequences(windows[order], fmt, tokenizer)
    return [TextExample(names[i], row) for i, row in zip(order, ids, strict=True)]
