"""Pooling the video classifier's evaluations over training seeds: per-clip differences averaged over the models."""

import argparse
import json

import pytest

from benchmarks.video_vit_fashion import pool


def eval_run(hits: dict[str, str], clip_seed: int = 0) -> dict:
    rows = [{"method": "none", "r": 0}] + [{"method": m, "r": 32} for m in ("tome", "quickmerge")]
    return {"args": {"clip_seed": clip_seed}, "clips": len(hits["none@0"]), "rows": rows, "hits": hits}


def run_pool(tmp_path, runs: list[dict], png: str | None = None) -> dict:
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"eval{i}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "pooled.json"
    pool(argparse.Namespace(evals=[str(p) for p in paths], json=str(out), png=png))
    return json.loads(out.read_text())


def test_pool_averages_each_clips_difference_over_the_models(tmp_path):
    first = eval_run({"none@0": "1111", "tome@32": "1100", "quickmerge@32": "1110"})   # QuickMerge++ +1 clip
    second = eval_run({"none@0": "1110", "tome@32": "1110", "quickmerge@32": "1010"})  # QuickMerge++ -1 clip
    pooled = run_pool(tmp_path, [first, second])
    row = pooled["rows"][0]
    assert row["r"] == 32 and row["models"] == 2
    assert row["tome_top1"] == pytest.approx(100 * (2 / 4 + 3 / 4) / 2)
    assert row["quickmerge_top1"] == pytest.approx(100 * (3 / 4 + 2 / 4) / 2)
    # per clip, averaged over the two models: 0, -0.5, +0.5, 0 -> mean 0
    assert row["quickmerge_minus_tome"][0] == pytest.approx(0.0)
    assert row["tome_minus_unpatched"][0] == pytest.approx(100 * ((-2 / 4) + 0) / 2)
    assert pooled["unpatched_top1"] == pytest.approx(100 * (1 + 3 / 4) / 2)
    alone = run_pool(tmp_path, [first, first])["rows"][0]  # one model twice: that model's own difference
    assert alone["quickmerge_minus_tome"][0] == pytest.approx(25.0)


def test_pool_refuses_evaluations_of_different_clips(tmp_path):
    first = eval_run({"none@0": "11", "tome@32": "10", "quickmerge@32": "11"})
    with pytest.raises(SystemExit, match="same clips"):
        run_pool(tmp_path, [first, eval_run(first["hits"], clip_seed=1)])


def test_pool_refuses_a_plot_of_untimed_evaluations_before_any_work(tmp_path):
    untimed = eval_run({"none@0": "11", "tome@32": "10", "quickmerge@32": "11"})
    with pytest.raises(SystemExit, match="--rounds > 0"):
        run_pool(tmp_path, [untimed, untimed], png=str(tmp_path / "plot.png"))
    assert not (tmp_path / "pooled.json").exists() and not (tmp_path / "plot.png").exists()
