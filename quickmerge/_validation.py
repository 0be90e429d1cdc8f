"""Argument checks shared by the public API.

Every check runs before any heavy work and raises ``TypeError`` (wrong kind of
object) or ``ValueError`` (right kind, wrong value) with a message that names the
argument and states what was expected. Checks of tensor *values* (finite, non-negative)
are gathered in a :class:`ValueChecks` and read back together, so a public call costs
at most one host-device synchronisation for its argument checks.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor


class ValueChecks:
    """Conditions on tensor values, computed on the tensors' device and read back with one sync."""

    def __init__(self) -> None:
        self._conditions: list[Tensor] = []
        self._messages: list[str] = []

    def require(self, condition: Tensor, message: str) -> None:
        """Fail with ``ValueError(message)`` unless the 0-d bool ``condition`` holds."""
        self._conditions.append(condition.reshape(()))
        self._messages.append(message)

    def finite(self, x: Tensor, name: str) -> None:
        # min/max propagate NaN and expose +-inf: one cheap reduction instead of an isfinite copy.
        low, high = torch.aminmax(x.detach())
        self.require(torch.isfinite(low) & torch.isfinite(high), f"{name} contains NaN or infinite values")

    def nonnegative(self, x: Tensor, name: str) -> None:
        self.require(x.detach().min() >= 0, f"{name} must be non-negative")

    def resolve(self) -> None:
        """Read every condition back at once (one host-device sync); raise the first that failed."""
        if not self._conditions:
            return
        held = torch.stack([c.to(self._conditions[0].device) for c in self._conditions]).tolist()
        self._conditions, messages, self._messages = [], self._messages, []
        for ok, message in zip(held, messages, strict=True):
            if not ok:
                raise ValueError(message)


def check_tokens(
    x: object, name: str = "X", *, rank: int = 3, dim: int | None = None, checks: ValueChecks | None = None
) -> Tensor:
    """Check a floating token tensor of shape ``[B, N, D]`` (rank 3) or ``[N, D]`` (rank 2).

    Its values are checked (finite) in ``checks`` if given, else at once.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16), got dtype {x.dtype}")
    shape = "[B, N, D]" if rank == 3 else "[N, D]"
    if x.dim() != rank:
        raise ValueError(f"{name} must have shape {shape} (rank {rank}), got shape {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"{name} must hold at least one token (N >= 1), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0 or (rank == 3 and x.shape[0] == 0):
        raise ValueError(f"{name} must have non-empty batch and embedding dimensions, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(
            f"{name} must have embedding dimension D={dim} (the module's embedding_dim), got D={x.shape[-1]}"
        )
    _value_checks(checks, lambda c: c.finite(x, name))
    return x


def _value_checks(checks: ValueChecks | None, add: Any) -> None:
    """Add value checks to ``checks``, or run them now when no collection is given."""
    own = ValueChecks() if checks is None else checks
    add(own)
    if checks is None:
        own.resolve()


def check_num_tokens(k: object, n: int, name: str = "K") -> int:
    """Check a token count ``1 <= K <= N`` given as a Python or 0-d integer tensor."""
    if isinstance(k, Tensor):
        if k.dim() != 0 or k.is_floating_point() or k.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer, got tensor of shape {tuple(k.shape)} and dtype {k.dtype}")
        k = int(k.item())
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"{name} must be an integer number of tokens, got {type(k).__name__} {k!r}")
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"{name} must satisfy 1 <= {name} <= N={n}, got {name}={k}")
    return k


def check_real(value: object, name: str, *, low: float, high: float, low_open: bool, high_open: bool) -> float:
    """Check a real number in an interval; ``*_open`` excludes that end."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    lo_ok = v > low if low_open else v >= low
    hi_ok = v < high if high_open else v <= high
    if not (math.isfinite(v) and lo_ok and hi_ok):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return v


def check_positive_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Check an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_scores(
    s: object, name: str, batch: int, n: int, *, nonnegative: bool = False, checks: ValueChecks | None = None
) -> Tensor:
    """Check per-token scores of shape ``[B, N]`` with finite (and optionally non-negative) floating values."""
    if not isinstance(s, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, N], got {type(s).__name__}")
    if not s.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {s.dtype}")
    if tuple(s.shape) != (batch, n):
        raise ValueError(f"{name} must have shape [B, N] = [{batch}, {n}], got {tuple(s.shape)}")

    def add(c: ValueChecks) -> None:
        c.finite(s, name)
        if nonnegative:
            c.nonnegative(s, name)

    _value_checks(checks, add)
    return s


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value  # type: ignore[return-value]
