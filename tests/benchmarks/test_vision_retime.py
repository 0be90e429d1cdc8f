"""Re-timing eval vision runs together: each setting once, rebuilt as the job that produced it."""

import pytest

from benchmarks.vision_retime import job_of, merge_runs

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_rows_are_rebuilt_as_their_jobs_and_each_setting_is_timed_once():
    entropy = {"label": "quickmerge-entropy", "similarity": "hidden"}
    run1 = {"rows": [{"method": "none", "r": 0, "settings": {}, "accuracy": 0.9, "speedup": 1.0},
                     {"method": "tome", "r": 16, "settings": {}, "accuracy": 0.8, "speedup": 1.2,
                      "speedup_per_round": [1.2], "seconds_per_round": [0.5], "unpatched_seconds_per_round": [0.6],
                      "timing_steal_share": 0.02},
                     {"method": "quickmerge-entropy", "r": [20, 4, 2], "settings": entropy, "accuracy": 0.7}]}
    run2 = {"rows": [{"method": "none", "r": 0, "settings": {}, "accuracy": 0.9, "speedup": 1.1},
                     {"method": "tome", "r": [16, -0.5], "settings": {}, "accuracy": 0.6}]}
    rows = merge_runs([run1, run2])
    assert [row["method"] for row in rows] == ["none", "tome", "quickmerge-entropy", "tome"]  # none once
    assert not any(key in row for row in rows for key in ("speedup", "speedup_per_round", "seconds_per_round",
                                                           "unpatched_seconds_per_round", "timing_steal_share"))
    assert rows[1]["accuracy"] == 0.8  # accuracies kept
    jobs = [job_of(row, num_layers=3) for row in rows]
    assert jobs[0] == (None, 0, {}) and jobs[1] == ("tome", 16, {})
    assert jobs[2] == ("quickmerge", [20, 4, 2], entropy)  # a labelled schedule is QuickMerge++ with its settings
    assert jobs[3] == ("tome", (16, -0.5), {})  # ToMe's (r, inflect), stored as a list
    assert job_of(rows[3], num_layers=2)[1] == [16, -0.5]  # two blocks: a per-block list
