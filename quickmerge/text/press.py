"""What every press shares: its ratio, the lengths it reports, and hooks that live for one ``with`` block."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .._validation import check_real
from ..compile_guard import guard_hooks
from .decoder import base_model, decoder_layers, warn_if_untested


@dataclass
class Press:
    """Base of quickmerge's presses, used like a kvpress press: ``with press(model): ...``.

    Args:
        compression_ratio: share of the prompt's entries (tokens) removed, in [0, 1);
            kept = ``int(L * (1 - ratio))``, as kvpress computes it.
    After a prefill, ``original_length``, ``compressed_length`` and ``achieved_ratio`` report
    what was done, until the next prefill (entering the press again to decode keeps them).
    Subclasses register their hooks in :meth:`_hooks`, reset per-prompt state in
    :meth:`_new_prompt` and drop references in :meth:`_release`; hooks are registered on
    this model instance when the ``with`` block starts and removed when it ends.
    """

    compression_ratio: float = 0.5
    original_length: int | None = field(default=None, init=False)
    compressed_length: int | None = field(default=None, init=False)
    _entries: tuple[int, int] = field(default=(0, 0), init=False, repr=False)  # (before, after) over layers

    def __post_init__(self) -> None:
        check_real(self.compression_ratio, "compression_ratio", low=0.0, high=1.0, low_open=False, high_open=True)

    def kept(self, length: int) -> int:
        """Entries kept out of ``length`` at this press's ratio (at least one)."""
        return max(1, int(length * (1 - self.compression_ratio)))

    @property
    def achieved_ratio(self) -> float | None:
        """Share of entries actually removed by the last prefill, over the layers it compressed
        (None before any)."""
        before, after = self._entries
        return None if not before else 1.0 - after / before

    def _record(self, original: int, compressed: int) -> None:
        """One layer (or the input) of ``original`` entries now holds ``compressed``."""
        before, after = self._entries
        self._entries = (before + original, after + compressed)
        self.original_length = original
        self.compressed_length = round(self._entries[1] * original / self._entries[0])  # mean over layers

    def _new_prompt(self) -> None:
        """A prefill of a new prompt starts: forget what was reported about the previous one."""
        self.original_length = self.compressed_length = None
        self._entries = (0, 0)

    def _hooks(self, model: nn.Module, layers: list[nn.Module]) -> list[Any]:
        """Register this press's hooks on ``model``'s decoder ``layers``; returns their handles."""
        raise NotImplementedError

    def refusal(self, model: nn.Module) -> str | None:
        """Why this press cannot run on ``model`` as loaded (and what to do instead), or None: what a harness
        checks for every method before any work, and the press itself when it patches or first runs."""
        return None

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        """Patch ``model`` (this instance only) for the duration of the ``with`` block."""
        layers = decoder_layers(model)
        warn_if_untested(model, type(self).__name__)
        guard_hooks()  # a graph compiled without these hooks must not run in the with block (compile_guard.py)
        # the padding check reads the caller's 2D mask, on the model and on its decoder stack (called alone,
        # as model.model(...), it gets the caller's mask too; from a vision-language model, a dict of prepared
        # masks, which the check leaves to the outer model's)
        checked = {id(m): m for m in (model, base_model(model))}.values()
        handles = [m.register_forward_pre_hook(self._check_unpadded, with_kwargs=True) for m in checked]
        handles += self._hooks(model, layers)
        try:
            with self._attention(model):
                yield
        finally:
            for handle in handles:
                handle.remove()
            self._release()

    def _check_unpadded(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError(
                f"{type(self).__name__} supports batches of equal-length, unpadded sequences only; "
                "got an attention_mask with padding"
            )

    def _attention(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """A context that adapts ``model``'s attention implementation while the press is active."""
        return contextlib.nullcontext()

    def _release(self) -> None:
        """Drop references to tensors of the last call (end of a ``with`` block)."""
