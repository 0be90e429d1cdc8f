"""The scripts behind the fine-tuning verdicts: where the curves are compared, and the seeds pooled."""

import pytest

pytest.importorskip("safetensors")

from benchmarks.vision_finetune import compared_hits, correct_per_image, quickmerge_options
from benchmarks.vision_finetune_seeds import pooled_difference

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_each_curve_is_compared_at_each_r_and_interpolated_to_the_speed_up():
    unpatched = {"reference, unpatched": [1.0, 1.0, 0.0, 0.0]}
    curves = {"fine-tuned quickmerge + quickmerge": {40: [1.0, 0.0, 0.0, 1.0], 48: [0.0, 0.0, 1.0, 1.0]},
              "fine-tuned tome + tome": {40: [1.0, 1.0, 1.0, 1.0], 48: [0.0, 0.0, 0.0, 0.0]}}
    speedups = {"quickmerge": {40: 1.5, 48: 2.5}, "tome": {40: 2.2, 48: 2.6}}  # ToMe-style never runs as slow as 2x
    places = compared_hits(unpatched, curves, speedups, 2.0)
    assert list(places) == ["r=40", "r=48", "2.0x"]
    assert places["r=48"]["fine-tuned tome + tome"] == [0.0] * 4
    assert places["r=40"]["reference, unpatched"] == unpatched["reference, unpatched"]
    assert places["2.0x"]["fine-tuned quickmerge + quickmerge"] == [0.5, 0.0, 0.5, 1.0]  # halfway from 1.5x to 2.5x
    assert "fine-tuned tome + tome" not in places["2.0x"]  # outside its measured range: left out, not extrapolated


def test_quickmerge_scores_with_the_matching_its_fine_tune_trained_with(tmp_path, monkeypatch):
    import json

    import torch

    from benchmarks import vision_finetune

    (tmp_path / "config.json").write_text(json.dumps({"finetune": {"method": "quickmerge", "r": 40,
                                                                   "similarity": "hidden", "saliency_rule": "scaled"}}))
    assert quickmerge_options(str(tmp_path)) == {}  # patch's defaults since stop 72
    (tmp_path / "config.json").write_text(json.dumps({"finetune": {"method": "quickmerge", "r": 40,
                                                                   "similarity": "keys", "saliency_rule": "additive"}}))
    assert quickmerge_options(str(tmp_path)) == {"similarity": "keys", "saliency_rule": "additive"}
    (tmp_path / "config.json").write_text(json.dumps({"finetune": {"method": "quickmerge", "r": 40}}))  # before stop 48
    assert quickmerge_options(str(tmp_path)) == {"similarity": "keys", "saliency_rule": "additive"}  # then's defaults
    calls = []
    monkeypatch.setattr(vision_finetune, "patch", lambda model, **kw: calls.append(kw) or type("H", (), {
        "remove": lambda self: None})())
    monkeypatch.setattr(vision_finetune, "hits_per_image", lambda *a: torch.ones(2))
    for method in ("quickmerge", "tome"):
        correct_per_image(None, None, None, method=method, r=8, options={"similarity": "hidden"})
    assert calls[0]["similarity"] == "hidden" and "similarity" not in calls[1]  # ToMe-style keeps its own rule


def test_seeds_are_pooled_per_image_and_the_mean_is_the_mean_of_the_seeds():
    seed0 = {"a": [1.0, 1.0, 0.0, 0.0] * 25, "b": [0.0, 1.0, 0.0, 0.0] * 25}  # a ahead by 25 points
    seed1 = {"a": [1.0, 1.0, 1.0, 0.0] * 25, "b": [0.0, 0.0, 0.0, 0.0] * 25}  # a ahead by 75 points
    diff, low, high = pooled_difference([seed0, seed1], "a", "b")
    assert diff == pytest.approx(50.0)
    assert low < diff < high
    # per image the two seeds average to +1, +0.5, +0.5, 0: less spread than seed 1's +1, +1, +1, 0
    alone, low1, high1 = pooled_difference([seed1], "a", "b")
    assert alone == pytest.approx(75.0) and high - low < high1 - low1 + 1e-9


def test_the_recipes_plot_reads_the_quickmerge_minus_tome_row_at_the_asked_place():
    from benchmarks.vision_finetune_recipes import difference_rows

    row = {"at": "2.0x", "a": "fine-tuned quickmerge + quickmerge", "b": "fine-tuned tome + tome", "mean_pt": -0.1}
    other = {**row, "b": "reference, unpatched", "mean_pt": 0.3}
    assert difference_rows({"rows": [other, {**row, "at": "r=40"}, row]}, "2.0x") is row
    with pytest.raises(SystemExit, match="r=48"):
        difference_rows({"rows": [other, row]}, "r=48")
