"""``quickmerge eval decoding`` end to end on a tiny random Llama: what it scores, that every method holds the same
memory, that it resumes from its journal, that two processes give the rows of one, and what it refuses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.eval.conftest import require_usable_kvpress
from tests.launch import child_env, rank_errors, run_here

pytest.importorskip("transformers")
pytest.importorskip("gensim")

ROOT = Path(__file__).resolve().parents[2]
# prompt 16, sizes 24 and 32, interval 8: the first merge after 16 (24) decoded tokens, scored from prediction 17 (25)
SETTINGS = ["--examples", "4", "--batch", "2", "--prompt", "16", "--continuation", "48", "--sizes", "24", "32",
            "--interval", "8", "--threads", "1"]


def _command(model_dir: str, out: Path, *extra: str, methods: tuple[str, ...] = ("quickmerge",)) -> list[str]:
    return [sys.executable, "-m", "quickmerge", "eval", "decoding", "--model", model_dir, *SETTINGS,
            "--methods", *methods, "--out", str(out), *extra]


def _rows(results: dict, method: str, size: int) -> dict:
    return next(r for r in results["summary"] if r["method"] == method and r["decoding_size"] == size)


def _journal(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(Path(str(out) + ".journal").glob("rank*.jsonl"))
            for line in path.read_text().splitlines()]


def _windows(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quickmerge.eval.text import wikipedia_windows

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.set_attn_implementation("sdpa")
    windows = wikipedia_windows(AutoTokenizer.from_pretrained(model_dir), 4, context=16, continuation=48)
    return model, windows


@pytest.fixture(scope="module")
def finished(tiny_lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("decoding") / "run"
    assert run_here(_command(tiny_lm_dir, out)) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def test_no_compression_is_scored_from_the_first_prediction_a_compressed_cache_makes(tiny_lm_dir, finished):
    import torch

    from quickmerge.eval.decoding import DecodingBudget, continuation_nll, make_press

    _, results = finished
    model, windows = _windows(tiny_lm_dir)
    ids = torch.stack([w.ids for w in windows])
    with torch.no_grad():  # one teacher-forced pass: what decoding one token per call must give
        logits = model(ids).logits[:, 15:-1].float()
    whole = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 16:], reduction="none")
    for size, first in ((24, 17), (32, 25)):  # the call filling the cache to S + I merges after its attention
        assert DecodingBudget(16, size, 8).first_scored == first
        assert _rows(results, "none", size)["nll_per_example"] == pytest.approx(
            whole[:, first:].mean(dim=1).tolist(), abs=1e-5)
        merged, _ = continuation_nll(model, ids, 16, make_press("quickmerge", size, 8))
        plain, _ = continuation_nll(model, ids, 16, None)
        assert torch.allclose(merged[:, :first], plain[:, :first], atol=1e-6)  # the same model until the merge
        assert not torch.allclose(merged[:, first], plain[:, first], atol=1e-4)  # and not after it
        assert _rows(results, "quickmerge", size)["nll_per_example"] == pytest.approx(
            merged[:, first:].mean(dim=1).tolist(), abs=1e-6)


def test_each_budget_holds_the_cache_to_its_size(finished):
    _, results = finished
    none = _rows(results, "none", 24)["mean_cache_entries"]
    assert none == pytest.approx((17 + 64) / 2)  # 17 .. 64 entries after the 48 decoding calls
    for size in (24, 32):
        ours = _rows(results, "quickmerge", size)
        assert ours["mean_cache_entries"] < none and ours["memory_saved"] == pytest.approx(
            1 - ours["mean_cache_entries"] / none)
    assert _rows(results, "quickmerge", 24)["mean_cache_entries"] < _rows(results, "quickmerge", 32)[
        "mean_cache_entries"]
    assert Path(str(finished[0]) + ".png").stat().st_size > 10_000


def test_kvpress_presses_hold_the_same_memory_at_the_same_steps(tiny_lm_dir, tmp_path):
    require_usable_kvpress()
    out = tmp_path / "run"
    methods = ("quickmerge", "quickmerge-w4", "kvpress-snapkv-w7", "kvpress-tova", "kvpress-knorm")
    assert run_here(_command(tiny_lm_dir, out, methods=methods)) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    theirs = methods[2:]
    for size in (24, 32):
        caches = {m: _rows(results, m, size)["mean_cache_entries"] for m in methods}
        assert len(set(caches.values())) == 1, caches  # equal memory at every step: a fair comparison
        best = min(theirs, key=lambda m: _rows(results, m, size)["perplexity"])
        for ours in ("quickmerge", "quickmerge-w4"):  # each configuration of ours against every press
            paired = results["paired_by_method"][ours][str(size)]
            assert set(paired["quickmerge_vs_each"]) == set(theirs) and paired["best_kvpress"] == best
            assert paired["ours"] == ours
        assert results["paired"][str(size)] == results["paired_by_method"]["quickmerge"][str(size)]
        # window 4 scores with other queries than the default (a third of the size), and keeps fewer entries whole
        assert _rows(results, "quickmerge-w4", size)["nll_per_example"] != _rows(results, "quickmerge", size)[
            "nll_per_example"]


def test_a_second_run_computes_nothing_again_and_more_windows_only_the_new_ones(tiny_lm_dir, finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(str(finished[0]) + ".journal", str(out) + ".journal")
    lines = len(_journal(out))
    assert lines == 4 * 3  # none once, quickmerge at two sizes
    assert run_here(_command(tiny_lm_dir, out)) == 0
    assert len(_journal(out)) == lines
    rerun = json.loads(out.with_suffix(".json").read_text())
    assert rerun["summary"] == finished[1]["summary"]
    kept = {e["key"]: e["row"] for e in _journal(out)}
    for examples in ("5", "6"):  # batches of 2: window 4 alone, then again beside window 5
        assert run_here([a if a != "4" else examples for a in _command(tiny_lm_dir, out)]) == 0
    keys = [e["key"] for e in _journal(out)]
    assert len(keys) == len(set(keys)) == 6 * 3, "a journaled window was written again"
    assert all({e["key"]: e["row"] for e in _journal(out)}[k] == row for k, row in kept.items())


def test_other_settings_are_refused_until_fresh(tiny_lm_dir, finished, tmp_path, refused):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(str(finished[0]) + ".journal", str(out) + ".journal")
    changed = [a if a != "48" else "40" for a in _command(tiny_lm_dir, out)]  # --continuation 40
    refused(changed[3:], "continuation.*--fresh")
    assert run_here([*changed, "--fresh"]) == 0


@pytest.mark.parametrize(("change", "pattern"), [
    (["--sizes", "20"], "multiple of the interval"),
    (["--prompt", "40"], r"prompt \(40\) <= size"),
    (["--continuation", "16"], "--continuation .16. must be at least"),
    (["--examples", "1"], "at least 2"),
    (["--methods", "kvpress-snapkv-w8"], "window must be a whole number from 1 to interval - 1 .7."),
    (["--methods", "kvpress-leverage"], "unknown kvpress decoding scorer"),
    (["--methods", "tome-kv"], "unknown method"),
    (["--methods", "quickmerge-w0"], "decoding window must be a whole number >= 1"),
    (["--methods", "quickmerge-w24"], r"decoding window must be below every size \(24\)"),
    (["--methods", "none"], "at least one method besides none"),
])
def test_bad_arguments_are_refused_before_a_model_loads(tmp_path, refused, change, pattern):
    argv = ["eval", "decoding", "--model", str(tmp_path / "no-such-model"), *SETTINGS, "--out", str(tmp_path / "r")]
    for flag, value in zip(change[::2], change[1::2], strict=True):
        at = argv.index(flag) if flag in argv else len(argv)
        end = at + 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1
        argv[at:end] = [flag, value]
    refused(argv, pattern)
    assert not Path(str(tmp_path / "r") + ".journal").exists()


def test_two_processes_under_torchrun_give_the_rows_of_one(tiny_lm_dir, finished, tmp_path):
    out = tmp_path / "run"
    command = _command(tiny_lm_dir, out)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                *command[2:]]
    result = subprocess.run(torchrun, cwd=ROOT, env=child_env(HF_HUB_OFFLINE="1", TQDM_DISABLE="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, rank_errors(result.stderr)
    assert sorted(p.name for p in Path(str(out) + ".journal").glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    both = json.loads(out.with_suffix(".json").read_text())
    assert both["config"]["processes"] == 2
    assert both["summary"] == finished[1]["summary"]


def test_a_model_quickmergepress_refuses_is_named_for_every_configuration_of_ours(tiny_lm_dir, tmp_path, monkeypatch,
                                                                                 refused):
    from quickmerge.text import QuickMergePress

    monkeypatch.setattr(QuickMergePress, "refusal", lambda self, model: "a reason of the press's own")
    argv = _command(tiny_lm_dir, tmp_path / "r", methods=("quickmerge", "quickmerge-w4"))[3:]
    refused(argv, r"--methods: quickmerge, quickmerge-w4 cannot run on LlamaForCausalLM: a reason of the press's own")
    only_variant = _command(tiny_lm_dir, tmp_path / "r2", methods=("quickmerge-w4",))[3:]
    refused(only_variant, r"--methods: quickmerge-w4 cannot run on LlamaForCausalLM")
