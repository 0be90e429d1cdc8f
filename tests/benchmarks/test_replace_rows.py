"""Putting a rerun's rows into an old result: only on the same protocol, examples and uncompressed NLLs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.replace_rows import replace_rows

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def run(rows: dict, examples=("a", "b"), none=(1.0, 2.0), protocol="video"):
    summary = [{"method": "none", "compression_ratio": None, "nll_per_example": list(none),
                "ratio_to_uncompressed": 1.0}]
    summary += [{"method": m, "compression_ratio": r, "nll_per_example": nll, "ratio_to_uncompressed": ratio}
                for (m, r), (nll, ratio) in rows.items()]
    return {"examples": list(examples), "summary": summary, "format": {"name": "video"},
            "config": {"protocol": protocol, "model": "video", "video": None, "command": "eval"}}


OLD = run({("spans", 0.5): ([1.2, 2.2], 1.10), ("kvpress-x", 0.5): ([1.1, 2.1], 1.05),
           ("frame", 0.5): ([1.0, 2.1], 1.03)})
NEW = run({("spans", 0.5): ([1.1, 2.3], 1.09), ("frame", 0.5): ([1.0, 2.1], 1.03),
           ("spans", 0.75): ([1.3, 2.4], 1.2)})


def test_the_rerun_rows_replace_the_old_ones_and_the_rest_stay():
    merged, changed = replace_rows(OLD, NEW)
    rows = {(r["method"], r["compression_ratio"]): r for r in merged["summary"]}
    assert rows["spans", 0.5]["nll_per_example"] == [1.1, 2.3]
    assert rows["kvpress-x", 0.5]["nll_per_example"] == [1.1, 2.1]  # not rerun: kept
    assert rows["spans", 0.75]["ratio_to_uncompressed"] == 1.2  # new: added
    assert {(c["method"], c["compression_ratio"]): c["ratio_to_uncompressed"] for c in changed} == {
        ("spans", 0.5): [1.10, 1.09], ("frame", 0.5): [1.03, 1.03], ("spans", 0.75): [None, 1.2]}
    assert merged["config"]["replaced_rows"] == [["spans", 0.5], ["frame", 0.5], ["spans", 0.75]]
    assert OLD["summary"][1]["nll_per_example"] == [1.2, 2.2]  # the old result itself is untouched
    only, _ = replace_rows(OLD, NEW, ["frame"])
    kept = {(r["method"], r["compression_ratio"]): r for r in only["summary"]}
    assert kept["spans", 0.5]["nll_per_example"] == [1.2, 2.2]


@pytest.mark.parametrize("other, message", [
    (run({}, examples=("a", "c")), "other examples"),
    (run({}, none=(1.0, 2.001)), "differ between the runs by up to 1.00e-03"),
    (run({}, protocol="image"), "differ in"),
])
def test_runs_that_did_not_score_the_same_thing_are_refused(other, message):
    with pytest.raises(SystemExit, match=message):
        replace_rows(OLD, other)


def test_uncompressed_nlls_may_differ_by_rounding():
    merged, _ = replace_rows(OLD, run({("spans", 0.5): ([1.1, 2.3], 1.09)}, none=(1.0 + 2e-7, 2.0)))
    assert merged["config"]["uncompressed_nll_apart"] == pytest.approx(2e-7)
    with pytest.raises(SystemExit, match="tolerance 1e-08"):
        replace_rows(OLD, run({}, none=(1.0 + 2e-7, 2.0)), tolerance=1e-8)


def test_command_line_writes_the_merged_result(tmp_path):
    paths = [tmp_path / "old.json", tmp_path / "new.json"]
    for path, result in zip(paths, (OLD, NEW), strict=True):
        path.write_text(json.dumps(result))
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "replace_rows.py"
    out = tmp_path / "merged.json"
    done = subprocess.run([sys.executable, str(script), *map(str, paths), "--out", str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "spans @ 0.5: vs none 1.1000 -> 1.0900" in done.stdout
    assert len(json.loads(out.read_text())["summary"]) == 5
    bad = subprocess.run([sys.executable, str(script), *map(str, paths), "--out", str(out), "--methods", "nope"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--methods: not in NEW: nope" in bad.stderr
