"""Running a quickmerge press inside NVIDIA kvpress's ``kv-press-text-generation`` pipeline.

kvpress's pipeline prefills the context under the press and decodes the question and the
answer outside it, unless the press is one of kvpress's decoding presses. A merged cache
decoded outside the press is still right (positions and masks, :mod:`.cache`) but loses
proportional attention, the ``+log(size)`` of merged entries. :func:`for_kvpress_pipeline`
wraps a press as a kvpress ``PrefillDecodingPress``, so the pipeline keeps it active while
it decodes too::

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question=question, press=for_kvpress_pipeline(QuickMergePress(0.5)))
"""

from __future__ import annotations

import functools
from typing import Any

from .._optional import require
from .press import Press


@functools.cache
def _pipeline_press_type() -> type:
    kvpress = require("kvpress", "kvpress", "Running a quickmerge press in kvpress's pipeline")

    class QuickMergePipelinePress(kvpress.PrefillDecodingPress):
        """A quickmerge press that kvpress's pipeline keeps active for prefill and decoding."""

        def __init__(self, press: Press) -> None:
            super().__init__(prefilling_press=None, decoding_press=None)
            self.press = press

        def __call__(self, model: Any) -> Any:
            return self.press(model)

        def __getattr__(self, name: str) -> Any:  # achieved_ratio, seed_share(), ...
            if "press" not in self.__dict__:  # during copy/unpickling: a plain AttributeError
                raise AttributeError(name)
            return getattr(self.__dict__["press"], name)

    return QuickMergePipelinePress


def for_kvpress_pipeline(press: Press) -> Any:
    """``press`` wrapped for kvpress's pipeline: active while it prefills and while it decodes."""
    if not isinstance(press, Press):
        raise TypeError(f"press must be a quickmerge press, got {type(press).__name__}")
    return _pipeline_press_type()(press)
