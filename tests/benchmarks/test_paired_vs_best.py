"""The scripts behind the published paired verdicts: which press is "best", the paired ratio, pooling runs."""

import math

import pytest

from benchmarks.paired_vs_best import compare, pool_runs
from benchmarks.video_test_sets import against_best

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def _row(method, ratio, nll, saved):
    return {"method": method, "compression_ratio": ratio, "perplexity": math.exp(sum(nll) / len(nll)),
            "memory_saved": saved, "nll_per_example": nll}


def _run(titles, rows, model="m"):
    return {"examples": titles, "summary": rows, "config": {"model": model}}


OURS = [1.0, 2.0, 3.0, 4.0]
SHRINKING = [1.1, 2.1, 2.9, 4.2]  # a press that frees memory, beaten by ours on 3 of 4
MASKING = [0.9, 1.8, 2.8, 3.9]  # the lowest perplexity, but it frees nothing


def test_the_best_press_and_the_best_that_frees_memory_are_each_compared_with_a_paired_ratio():
    run = _run(["a", "b", "c", "d"], [_row("none", None, [1.0] * 4, 0.0), _row("quickmerge", 0.5, OURS, 0.5),
                                      _row("kvpress-shrink", 0.5, SHRINKING, 0.5),
                                      _row("kvpress-mask", 0.5, MASKING, 0.0)])
    rows = {r["best_kvpress"]: r for r in compare(run)}
    assert set(rows) == {"kvpress-mask", "kvpress-shrink"}
    assert rows["kvpress-mask"]["kind"] == "best" and rows["kvpress-shrink"]["kind"] == "best that shrinks the cache"
    shrink = rows["kvpress-shrink"]
    expected = math.exp(sum(a - b for a, b in zip(OURS, SHRINKING, strict=True)) / 4)
    assert shrink["ratio_to_best"] == pytest.approx(expected) and shrink["lower_on"] == 3 and shrink["examples"] == 4
    low, high = shrink["ratio_to_best_ci95"]
    assert low <= shrink["ratio_to_best"] <= high


def test_a_best_press_that_also_frees_memory_is_labelled_best_once():
    run = _run(["a", "b", "c", "d"], [_row("quickmerge", 0.5, OURS, 0.5), _row("kvpress-shrink", 0.5, MASKING, 0.5),
                                      _row("kvpress-worse", 0.5, SHRINKING, 0.5)])
    rows = compare(run)
    assert [(r["best_kvpress"], r["kind"]) for r in rows] == [("kvpress-shrink", "best")]


def test_runs_on_disjoint_examples_pool_and_overlapping_or_different_runs_are_refused():
    first = _run(["a", "b"], [_row("quickmerge", 0.5, OURS[:2], 0.5), _row("kvpress-x", 0.5, SHRINKING[:2], 0.5)])
    second = _run(["c", "d"], [_row("quickmerge", 0.5, OURS[2:], 0.5), _row("kvpress-x", 0.5, SHRINKING[2:], 0.5),
                               _row("kvpress-only-here", 0.5, MASKING[2:], 0.5)])
    pooled = pool_runs([first, second])
    assert pooled["examples"] == ["a", "b", "c", "d"]
    assert {r["method"] for r in pooled["summary"]} == {"quickmerge", "kvpress-x"}  # only rows every run has
    ours = next(r for r in pooled["summary"] if r["method"] == "quickmerge")
    assert ours["nll_per_example"] == OURS and ours["perplexity"] == pytest.approx(math.exp(2.5))
    with pytest.raises(SystemExit, match="share examples"):
        pool_runs([first, first])
    with pytest.raises(SystemExit, match="differ in"):
        pool_runs([first, _run(["c", "d"], second["summary"], model="other")])


def test_the_figure_takes_each_method_against_the_best_press_of_all():
    rows = [{"ratio": 0.5, "method": "q", "best_kvpress": "kvpress-shrink", "ratio_to_best": 0.97},
            {"ratio": 0.5, "method": "q", "best_kvpress": "kvpress-mask", "ratio_to_best": 1.02},
            {"ratio": 0.75, "method": "q", "best_kvpress": "kvpress-shrink", "ratio_to_best": 0.9}]
    best = against_best(rows)
    assert best[0.5, "q"]["best_kvpress"] == "kvpress-mask" and best[0.75, "q"]["ratio_to_best"] == 0.9
