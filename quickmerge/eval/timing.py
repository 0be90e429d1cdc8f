"""Timing helpers: a wall clock that includes a device's queued work (CUDA kernels run asynchronously, so a timer
read right after a call would count only their launch), and how much of the machine a virtual host's neighbours
took meanwhile (steal), which decides whether a run's speed-ups can be trusted."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

PROC_STAT = Path("/proc/stat")
# runs under 15-20% steal moved the same model's speed-ups by tens of percent (BENCHMARKS.md, stop 76); 5% is a
# margin below what was seen, not a measured edge (an idle moment of this host showed under 1%)
STEAL_WARNING_SHARE = 0.05
_COUNTERS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` (seconds) once every kernel queued on ``device`` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def per_call_ms(fn: Callable[[], Any], calls: int, device: torch.device | None = None) -> float:
    """Milliseconds per call of ``fn()``: the mean of ``calls`` calls after one warm-up call, the device's queued
    work included (:func:`clock`; the CPU when ``device`` is None)."""
    if calls < 1:
        raise ValueError(f"calls must be a positive number of calls, got {calls}")
    device = device or torch.device("cpu")
    fn()
    start = clock(device)
    for _ in range(calls):
        fn()
    return (clock(device) - start) / calls * 1e3


def cpu_counters(path: Path = PROC_STAT) -> dict[str, int] | None:
    """The machine's CPU time counters, all CPUs together, in clock ticks (Linux's ``/proc/stat`` first line:
    user ... steal), or None where there is no such file or it reads otherwise."""
    try:
        fields = path.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if len(fields) < 1 + len(_COUNTERS) or fields[0] != "cpu" or not all(f.isdigit() for f in fields[1:9]):
        return None
    return dict(zip(_COUNTERS, map(int, fields[1:9]), strict=True))


def steal_share(before: Mapping[str, int] | None, after: Mapping[str, int] | None) -> float | None:
    """The share of the machine's CPU time between two :func:`cpu_counters` readings that the hypervisor gave to
    other guests (steal), in [0, 1]; None without both readings or with no tick between them."""
    if before is None or after is None:
        return None
    total = sum(after[k] - before[k] for k in _COUNTERS)
    return (after["steal"] - before["steal"]) / total if total > 0 else None


def warn_if_stolen(rows: Iterable[Mapping[str, Any]]) -> str | None:
    """Print (stderr) and return a warning when any timed row of ``rows`` ran under more than
    :data:`STEAL_WARNING_SHARE` steal (``timing_steal_share``); None otherwise."""
    rows = list(rows)
    shares = [row["timing_steal_share"] for row in rows if row.get("timing_steal_share") is not None]
    if not shares or max(shares) <= STEAL_WARNING_SHARE:
        return None
    itself = next((row.get("speedup") for row in rows if row.get("method") == "none"), None)
    message = (f"warning: the timing ran under up to {max(shares):.0%} steal (CPU time this virtual machine's host "
               f"gave other guests, /proc/stat): its speed-ups are not reliable; time again on a quiet machine"
               + (f" (the unpatched model against itself: {itself:.2f}x)" if itself is not None else ""))
    print(message, file=sys.stderr)
    return message
