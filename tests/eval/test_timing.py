"""The eval timers count a device's queued work, not only its launch."""

import time

import pytest
import torch

from quickmerge.eval.timing import clock


def test_clock_waits_for_the_device_before_reading_the_time(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    before = time.perf_counter()
    assert clock(torch.device("cpu")) >= before and calls == []  # nothing to wait for on the CPU
    device = torch.device("cuda", 0)
    assert clock(device) >= before and calls == [device]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_clock_times_a_cuda_kernel_whole():
    x = torch.randn(4096, 4096, device="cuda")
    x @ x  # warm-up: the kernel's handle
    start = clock(x.device)
    for _ in range(20):
        y = x @ x
    launch = time.perf_counter() - start
    total = clock(x.device) - start
    assert total > 2 * launch and torch.isfinite(y).all()  # without the wait both would read the launch alone
