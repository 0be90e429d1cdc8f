"""How many tokens each layer merges: ToMe's ``r`` forms and a target keep ratio.

- ``r=16``: 16 tokens per layer; ``r=[8, 8, 16, ...]``: one entry per layer;
  ``r=(16, -0.5)``: ToMe's inflected schedule (16 on average, decreasing along depth).
- ``ratio=0.5``: the same number of tokens per layer, chosen so that the given fraction of
  the mergeable tokens is left after the last layer.
Every layer's r is capped at what its method can remove (half the tokens for ToMe's
bipartite matching, all but one for the others).
"""

from __future__ import annotations

from collections.abc import Sequence

RSpec = int | Sequence[int] | tuple[int, float]


def inflected_schedule(num_layers: int, r: int, inflect: float) -> list[int]:
    """ToMe's schedule: mean ``r`` per layer, slope ``inflect`` in [-1, 1] (negative: more early)."""
    if num_layers == 1:
        return [r]
    lo, hi = r * (1.0 - inflect), r * (1.0 + inflect)
    return [max(0, round(lo + (hi - lo) * i / (num_layers - 1))) for i in range(num_layers)]


def validate_r(r: object, num_layers: int) -> list[int]:
    """Per-layer r from ``r`` (int, per-layer list, or (r, inflect)); raises on bad input."""
    if isinstance(r, bool):
        raise TypeError(f"r must be an int, a list of {num_layers} ints or (r, inflect), got {r!r}")
    if isinstance(r, int):
        if r < 0:
            raise ValueError(f"r must be >= 0 tokens per layer, got {r}")
        return [r] * num_layers
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], float):
        if r[0] < 0 or not -1.0 <= r[1] <= 1.0:
            raise ValueError(f"r=(r, inflect) needs r >= 0 and -1 <= inflect <= 1, got {r}")
        return inflected_schedule(num_layers, r[0], r[1])
    if isinstance(r, Sequence) and not isinstance(r, str):
        values = list(r)
        if len(values) != num_layers or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError(f"a per-layer r must list {num_layers} ints (one per block), got {values!r}")
        if min(values) < 0:
            raise ValueError(f"r must be >= 0 in every layer, got {values}")
        return values
    raise TypeError(f"r must be an int, a list of {num_layers} ints or (r, inflect), got {r!r}")


def r_for_ratio(ratio: float, mergeable: int, num_layers: int) -> list[int]:
    """Constant r per layer leaving ``ratio`` of ``mergeable`` tokens after the last layer."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be a fraction of tokens to keep in (0, 1], got {ratio!r}")
    remove = mergeable - max(1, round(ratio * mergeable))
    base, extra = divmod(remove, num_layers)
    return [base + (1 if i < extra else 0) for i in range(num_layers)]
