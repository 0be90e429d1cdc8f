"""The decoding-merge benchmark's bookkeeping: which layer's cache it measures, and which runs it may resume or pool."""

import argparse
import json
from types import SimpleNamespace

import pytest

from benchmarks.decoding_merge import journal_config, pooled
from quickmerge.eval.decoding import full_attention_layer, method_label

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

CONFIG = {"windows": 2, "first": 0, "prompt": 128, "continuation": 640, "size": 192, "interval": 64}


def test_the_measured_layer_is_the_first_without_a_sliding_window():
    gemma = SimpleNamespace(config=SimpleNamespace(layer_types=["sliding_attention"] * 5 + ["full_attention"] * 2))
    assert full_attention_layer(gemma) == 5
    assert full_attention_layer(SimpleNamespace(config=SimpleNamespace())) == 0  # Llama: no layer types


def test_runs_from_before_the_model_option_read_as_smollm2_s():
    assert journal_config({"config": CONFIG}) == {"model": "smollm2-135m", **CONFIG}
    assert journal_config({"config": {**CONFIG, "model": "gemma3-270m"}})["model"] == "gemma3-270m"
    assert journal_config({}, default={"x": 1}) == {"x": 1}


def _journal(tmp_path, name, config, nll):
    (tmp_path / f"{name}.journal.json").write_text(json.dumps(
        {"config": config, **{f"{m}/0": {"nll": v, "cache": 200.0, "seconds": 1.0} for m, v in nll.items()}}))
    return str(tmp_path / f"{name}.json")


def test_pooling_joins_the_windows_of_one_model_and_refuses_two(tmp_path):
    nll = {"none": [1.0, 2.0], "quickmerge": [1.1, 2.1], "kvpress-tova": [1.2, 2.0]}
    old = _journal(tmp_path, "old", CONFIG, nll)  # written before --model existed: SmolLM2's
    new = _journal(tmp_path, "new", {**CONFIG, "first": 2, "model": "smollm2-135m"}, nll)
    out = tmp_path / "pooled.json"
    args = argparse.Namespace(pool=[old, new], out=str(out), plot=None, methods=list(nll))
    pooled(args)
    result = json.loads(out.read_text())
    assert result["config"]["windows"] == 4 and result["config"]["model"].startswith("SmolLM2")
    assert result["paired"]["best_kvpress"] == "kvpress-tova" and result["paired"]["lower_on"] == 2
    assert set(result["paired"]["quickmerge_vs_each"]) == {"kvpress-tova"}
    low, high = result["paired"]["quickmerge_vs_each"]["kvpress-tova"]["ratio"][1:]
    assert low <= 1.0 <= high  # 0.1 below on two windows, 0.1 above on two
    gemma = _journal(tmp_path, "gemma", {**CONFIG, "model": "gemma3-270m"}, nll)
    with pytest.raises(SystemExit, match="differ in more than their windows"):
        pooled(argparse.Namespace(pool=[old, gemma], out=str(out), plot=None, methods=list(nll)))


def test_plot_labels_name_the_press_and_its_window():
    assert method_label("kvpress-snapkv-w63") == "kvpress DecodingPress(SnapKV, window 63)"
    assert method_label("kvpress-expected-attention") == "kvpress DecodingPress(ExpectedAttention)"
    assert method_label("quickmerge").startswith("QuickMerge++")
