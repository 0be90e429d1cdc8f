"""Long evaluations lose nothing: killed mid-run, the same command resumes without recomputing a
finished row and ends with the JSON an uninterrupted run writes; other settings are refused;
two processes under torch.distributed give the same rows as one."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.launch import child_env, rank_errors, run_here

pytest.importorskip("transformers")
pytest.importorskip("gensim")

ROOT = Path(__file__).resolve().parents[2]
TIMINGS = ("prefill_s", "decode_s", "prefill_s_median", "decode_s_median")


def _command(model_dir: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quickmerge", "eval", "text", "--model", model_dir, "--examples", "12",
            "--context", "96", "--continuation", "8", "--ratios", "0.5", "--methods", "quickmerge", "random",
            "--threads", "1", "--out", str(out), *extra]


def _env(slow_rows: Path | None = None) -> dict:
    """A child's environment (:func:`tests.launch.child_env`), ``slow_rows``' sitecustomize first where given."""
    env = child_env(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    if slow_rows is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(slow_rows), env["PYTHONPATH"]])
    return env


# A tiny model writes a row in milliseconds: under load the whole run could end before the signal
# lands. This sitecustomize (test-only) makes each journal write take 0.2 s in the run to be killed.
SLOW_ROWS = """
import time
from quickmerge.eval import journal
_add = journal.Journal.add
def add(self, key, row):
    _add(self, key, row)
    time.sleep(0.2)
journal.Journal.add = add
"""


def _journal_lines(out: Path) -> list[dict]:
    lines = []
    for path in sorted(Path(str(out) + ".journal").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(line))
    return lines


def _without_timings(results: dict) -> dict:
    summary = [{k: v for k, v in row.items() if k not in TIMINGS} for row in results["summary"]]
    return {"examples": results["examples"], "summary": summary}


@pytest.fixture(scope="module")
def uninterrupted(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    assert run_here(_command(tiny_lm_dir, out)) == 0
    return json.loads(out.with_suffix(".json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tiny_lm_dir, uninterrupted, tmp_path, sig):
    out = tmp_path / "run"
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(SLOW_ROWS)
    # a shell's background job (how CI may run us) inherits SIGINT ignored; the run gets the default back
    proc = subprocess.Popen(_command(tiny_lm_dir, out), cwd=ROOT, env=_env(slow), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(_journal_lines(out)) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    before = {entry["key"]: entry["row"] for entry in _journal_lines(out)}
    assert 4 <= len(before) < 36, "the run was not interrupted mid-way"
    assert not out.with_suffix(".json").exists()
    assert run_here(_command(tiny_lm_dir, out)) == 0
    after = _journal_lines(out)
    keys = [entry["key"] for entry in after]
    assert len(keys) == len(set(keys)) == 36, "a finished row was computed again (or one is missing)"
    assert all({e["key"]: e["row"] for e in after}[k] == row for k, row in before.items())
    resumed = json.loads(out.with_suffix(".json").read_text())
    assert _without_timings(resumed) == _without_timings(uninterrupted)


def test_other_settings_are_refused_until_fresh(tiny_lm_dir, tmp_path, refused):
    out = tmp_path / "run"
    command = [a if a != "12" else "2" for a in _command(tiny_lm_dir, out)]  # --examples 2: only the check matters
    assert run_here(command) == 0
    changed = [a if a != "96" else "64" for a in command]  # --context 64
    refused(changed[3:], "--fresh")
    assert run_here([*changed, "--fresh"]) == 0
    config = json.loads(out.with_suffix(".json").read_text())["config"]
    assert config["context"] == 64
    import transformers

    assert config["versions"]["transformers"] == transformers.__version__  # which release gave these numbers


def test_two_processes_under_torchrun_give_the_rows_of_one(tiny_lm_dir, uninterrupted, tmp_path):
    out = tmp_path / "run"
    command = _command(tiny_lm_dir, out)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                *command[2:]]
    result = subprocess.run(torchrun, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, rank_errors(result.stderr)
    assert sorted(p.name for p in Path(str(out) + ".journal").glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    both = json.loads(out.with_suffix(".json").read_text())
    assert both["config"]["processes"] == 2
    assert _without_timings(both) == _without_timings(uninterrupted)
