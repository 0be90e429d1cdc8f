"""``benchmarks/vision_speed.py``: the merge step's share of a block, and the host's steal while it was timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import child_env

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def test_every_method_is_timed_inside_a_block_and_the_json_says_how_much_of_the_host_it_had(tmp_path):
    pytest.importorskip("timm")
    from quickmerge.data import fashion_mnist
    from quickmerge.eval.timing import cpu_counters

    if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    out = tmp_path / "speed.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vision_speed.py"), "--batch", "4", "--r", "8",
                    "--repeats", "1", "--threads", "1", "--json", str(out)],
                   check=True, cwd=ROOT, env=child_env(), capture_output=True)
    info = json.loads(out.read_text())
    assert info["tokens"] == 197 and info["batch"] == 4 and info["r"] == 8
    assert set(info["results"]) == {"quickmerge", "tome", "random", "pool"}
    for row in info["results"].values():
        assert row["merge_s"] > 0 and row["merge_share_of_block"] == row["merge_s"] / row["block_s"]  # no timed bound
    if cpu_counters() is None:
        assert info["steal_share"] is None  # no /proc/stat: no figure claimed
    else:
        assert info["steal_share"] is None or 0.0 <= info["steal_share"] <= 1.0  # None: no tick in a short run
