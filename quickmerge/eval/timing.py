"""Wall-clock time that includes a device's queued work: CUDA kernels run asynchronously, so a timer read
right after a call would count only their launch."""

from __future__ import annotations

import time

import torch


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` (seconds) once every kernel queued on ``device`` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
