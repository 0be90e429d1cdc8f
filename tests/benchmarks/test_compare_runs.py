"""Comparing two runs: equality to the last bit, and how far each setting moved (a CPU run against a GPU run)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.compare_runs import compare, differences

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def text_run(nll_quickmerge, ratio_quickmerge):
    return {"examples": ["a", "b"], "summary": [
        {"method": "none", "compression_ratio": None, "nll_per_example": [1.0, 2.0], "ratio_to_uncompressed": 1.0},
        {"method": "quickmerge", "compression_ratio": 0.5, "nll_per_example": nll_quickmerge,
         "ratio_to_uncompressed": ratio_quickmerge}]}


def test_text_runs_report_the_largest_move_and_how_many_examples_moved(tmp_path):
    before, after = text_run([1.1, 2.2], 1.1), text_run([1.1, 2.25], 1.12)
    assert compare(before, before) and not compare(before, after)
    rows = {row["method"]: row for row in differences(before, after)}
    assert rows["none"]["max_abs_nll_difference"] == 0 and rows["none"]["examples_moved_over_1e-4"] == 0
    moved = rows["quickmerge"]
    assert abs(moved["max_abs_nll_difference"] - 0.05) < 1e-12 and moved["examples_moved_over_1e-4"] == 1
    assert moved["ratio_to_uncompressed"] == [1.1, 1.12] and moved["examples"] == 2
    paths = [tmp_path / "before.json", tmp_path / "after.json"]
    for path, run in zip(paths, (before, after), strict=True):
        path.write_text(json.dumps(run))
    out = tmp_path / "diff.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_runs.py"
    done = subprocess.run([sys.executable, str(script), *map(str, paths), "--json", str(out)], capture_output=True)
    assert done.returncode == 1 and json.loads(out.read_text())["settings"][1]["examples_moved_over_1e-4"] == 1


def test_vision_runs_report_both_accuracies():
    row = {"method": "tome", "r": 16, "settings": {}, "images": 10}
    before, after = {"rows": [{**row, "accuracy": 0.9}]}, {"rows": [{**row, "accuracy": 0.8}]}
    assert differences(before, after) == [{"setting": ["tome", "16", "{}"], "accuracy": [0.9, 0.8]}]


def test_vision_rows_with_hits_must_get_the_same_images_right():
    row = {"method": "tome", "r": 16, "settings": {}, "images": 16, "accuracy": 0.5}
    before = {"rows": [{**row, "hits": "ff00"}]}
    swapped = {"rows": [{**row, "hits": "7f80"}]}  # the same accuracy, one image right in each run only
    assert compare(before, before) and not compare(before, swapped)
    assert differences(before, swapped) == [{"setting": ["tome", "16", "{}"], "accuracy": [0.5, 0.5],
                                             "images_changed": 2}]
    older = {"rows": [row]}  # a run written before rows kept their hits: accuracies alone
    assert compare(before, older) and "images_changed" not in differences(before, older)[0]


def test_per_clip_hits_must_match_clip_by_clip_and_shared_only_ignores_the_settings_of_one_run():
    before = {"args": {}, "rows": [], "hits": {"none@0": "1101", "tome@32": "1001"}}
    after = {"args": {}, "rows": [], "hits": {"none@0": "1101", "tome@32": "1001", "quickmerge@32/queries=8": "1111"}}
    assert not compare(before, after) and compare(before, after, shared_only=True)
    moved = {**after, "hits": {**after["hits"], "tome@32": "0011"}}  # the same accuracy, two clips swapped
    assert not compare(before, moved, shared_only=True)
    assert differences(before, moved) == [{"setting": "none@0", "clips_changed": 0, "clips": 4},
                                          {"setting": "tome@32", "clips_changed": 2, "clips": 4}]
    assert not compare(before, {"hits": {"quickmerge@8": "1"}}, shared_only=True)  # nothing shared: no check
