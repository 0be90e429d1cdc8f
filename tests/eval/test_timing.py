"""The eval timers count a device's queued work, not only its launch; a timed run says how much steal it ran under."""

import time

import pytest
import torch

from quickmerge.eval import timing
from quickmerge.eval.timing import clock, cpu_counters, per_call_ms, steal_share, warn_if_stolen

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_clock_waits_for_the_device_before_reading_the_time(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    before = time.perf_counter()
    assert clock(torch.device("cpu")) >= before and calls == []  # nothing to wait for on the CPU
    device = torch.device("cuda", 0)
    assert clock(device) >= before and calls == [device]


def test_per_call_ms_is_the_mean_of_the_timed_calls_after_one_untimed_warm_up(monkeypatch):
    readings, called, clocked = iter([10.0, 10.5]), [], []  # seconds: 4 calls in 0.5 s

    def fake_clock(device):
        clocked.append((device, len(called)))
        return next(readings)

    monkeypatch.setattr(timing, "clock", fake_clock)
    device = torch.device("cuda", 0)
    assert per_call_ms(lambda: called.append(1), 4, device) == pytest.approx(125.0)
    assert clocked == [(device, 1), (device, 5)]  # started after the warm-up, read with the device's work done
    with pytest.raises(ValueError, match="calls must be a positive"):
        per_call_ms(lambda: None, 0)


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


def _stat(tmp_path, name, user, idle, steal):
    path = tmp_path / name
    path.write_text(f"cpu  {user} 0 10 {idle} 0 0 0 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nintr 1\n")
    return path


def test_steal_share_is_the_stolen_part_of_the_machines_ticks_between_two_readings(tmp_path):
    before = cpu_counters(_stat(tmp_path, "a", user=100, idle=50, steal=5))
    after = cpu_counters(_stat(tmp_path, "b", user=170, idle=60, steal=25))
    assert before["steal"] == 5 and before["user"] == 100 and before["system"] == 10
    assert steal_share(before, after) == pytest.approx(20 / (70 + 10 + 20))
    assert steal_share(before, before) is None  # no tick between them
    assert steal_share(None, after) is None and steal_share(before, None) is None
    assert cpu_counters(tmp_path / "absent") is None  # no /proc/stat (not Linux)
    (tmp_path / "odd").write_text("intr 1 2 3\n")
    assert cpu_counters(tmp_path / "odd") is None


def test_a_run_timed_under_steal_warns_with_the_figure_and_the_unpatched_models_ratio(capsys):
    quiet = [{"method": "none", "speedup": 0.98, "timing_steal_share": 0.01},
             {"method": "tome", "speedup": 2.0, "timing_steal_share": 0.03}]
    assert warn_if_stolen(quiet) is None and capsys.readouterr().err == ""
    assert warn_if_stolen([{"method": "tome", "speedup": 2.0}]) is None  # no reading: nothing claimed
    noisy = [*quiet, {"method": "quickmerge", "speedup": 2.1, "timing_steal_share": 0.2}]
    message = warn_if_stolen(noisy)
    assert message is not None and "20% steal" in message and "against itself: 0.98x" in message
    assert message in capsys.readouterr().err
    assert timing.STEAL_WARNING_SHARE == 0.05


def test_this_machines_counters_read_where_linux_has_them():
    counters = cpu_counters()
    if not timing.PROC_STAT.exists():
        pytest.skip("no /proc/stat")
    assert counters is not None and all(v >= 0 for v in counters.values()) and counters["idle"] > 0
