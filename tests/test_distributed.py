"""Object exchange between ranks: two processes under torchrun gather and broadcast objects of
uneven sizes (one empty) and sum values exactly, and every collective returns only after the
backend has let go of its tensors (the race that aborted a rank exiting right after its last
collective)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import IMPORT_LOG, child_env, rank_errors

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import pathlib
import sys

import torch
from quickmerge import distributed

from tests.launch import rank_errors

ctx = distributed.setup()
try:
    assert ctx.world == 2, ctx.world
    mine = {"rank": ctx.rank, "payload": "x" * (5000 if ctx.rank else 0), "tensor": torch.arange(3) + ctx.rank}
    gathered = ctx.gather(mine)
    if ctx.main:
        assert [g["rank"] for g in gathered] == [0, 1]
        assert [len(g["payload"]) for g in gathered] == [0, 5000]
        assert torch.equal(gathered[1]["tensor"], torch.tensor([1, 2, 3]))
    else:
        assert gathered is None
    assert ctx.broadcast({"from": ctx.rank, "big": list(range(ctx.rank * 10))}) == {"from": 0, "big": []}
    assert ctx.broadcast(None) is None
    assert ctx.sum(0.25 + ctx.rank) == 1.5
    probe = torch.zeros(1)
    torch.distributed.all_reduce(probe)
    distributed._wait_until_released(probe)
    if hasattr(torch.Tensor, "_use_count"):  # older torch cannot tell (the library does not wait there)
        assert probe._use_count() == 1, "the backend still holds the tensor"
    (pathlib.Path(sys.argv[1]) / f"rank{ctx.rank}.ok").write_text("ok")  # a file each: stdout lines interleave
finally:
    ctx.close()
"""


def test_two_ranks_exchange_objects_and_exit_cleanly(tmp_path):
    script = tmp_path / "exchange.py"
    script.write_text(SCRIPT)
    env = {name: value for name, value in child_env().items() if name in ("PYTHONPATH", IMPORT_LOG)}  # minimal
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env={**env, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, rank_errors(result.stderr)
    assert sorted(p.name for p in tmp_path.glob("rank*.ok")) == ["rank0.ok", "rank1.ok"]


def test_one_process_passes_objects_through():
    from quickmerge import distributed

    ctx = distributed.Context()
    obj = {"a": [1, 2]}
    assert ctx.gather(obj) == [obj] and ctx.broadcast(obj) is obj and ctx.sum(2.5) == 2.5
