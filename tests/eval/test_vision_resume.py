"""``quickmerge eval vision`` loses nothing when killed and gives one process's rows under torchrun."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("timm")
pytest.importorskip("safetensors")
from quickmerge.data import fashion_mnist
from tests.launch import child_env, rank_errors, run_here

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
    pytest.skip("dataset-fashion-mnist absent", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


def _command(checkpoint, out, *extra):
    return [sys.executable, "-m", "quickmerge", "eval", "vision", "--checkpoint", str(checkpoint), "--images", "256",
            "--batch-size", "64", "--r-values", "4", "8", "--methods", "quickmerge", "tome",
            "--timing-rounds", "1", "--threads", "1", "--out", str(out), *extra]


ENV = child_env(TQDM_DISABLE="1")
MEASURED = ("images_per_s", "unpatched_images_per_s", "speedup", "speedup_per_round", "seconds_per_round",
            "unpatched_seconds_per_round", "timing_steal_share")


def _rows(path):
    """The rows less timings; mean token counts rounded (summed over ranks in another order under torchrun)."""
    rows = [{k: v for k, v in row.items() if k not in MEASURED} for row in json.loads(path.read_text())["rows"]]
    return [{**row, "mean_tokens_per_layer": round(row["mean_tokens_per_layer"], 9)} for row in rows]


def test_killed_vision_eval_resumes_and_torchrun_gives_the_same_rows(tiny_vit_dir, tmp_path):
    checkpoint = tiny_vit_dir
    full = tmp_path / "full"
    assert run_here(_command(checkpoint, full)) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(_command(checkpoint, out), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    journal = Path(str(out) + ".journal") / "rank0.jsonl"
    deadline = time.time() + 120
    while (not journal.exists() or len(journal.read_text().splitlines()) < 3) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(journal.read_text().splitlines())
    assert 3 <= finished < 9 and not out.with_suffix(".json").exists()
    assert run_here(_command(checkpoint, out)) == 0
    keys = [json.loads(line)["key"] for line in journal.read_text().splitlines() if line.strip()]
    assert len(keys) == len(set(keys)) == 9  # 1 + 2 x 2 constant + 2 entropy schedules + 2 per-image, none twice
    assert _rows(out.with_suffix(".json")) == _rows(full.with_suffix(".json"))

    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "-m", *_command(checkpoint, two)[2:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, rank_errors(result.stderr)
    assert _rows(two.with_suffix(".json")) == _rows(full.with_suffix(".json"))
