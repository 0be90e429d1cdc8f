"""Retrieval tasks: the passkey is inserted once at its depth (the "once" needle states it a single time), the
repeated passage really repeats, exact match is exact, and `eval passkey` / `eval text --task repeated` run end
to end."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.cli import main  # noqa: E402
from quickmerge.eval.retrieval import (  # noqa: E402
    NEEDLE,
    NEEDLES,
    matches_key,
    passkey_trials,
    repeated_passage_windows,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_lm_dir)


def test_the_key_is_stated_once_at_its_depth(tokenizer):
    trials = passkey_trials(tokenizer, 6, min_context=300, max_context=600, seed=3)
    assert len({t.key for t in trials}) == 6 and all(len(t.key) == 5 for t in trials)
    for t in trials:
        assert 300 <= t.context.numel() <= 600
        text = "".join(map(chr, t.context.tolist()))  # the tiny tokenizer's ids are bytes
        needle = NEEDLE.format(key=t.key)
        assert text.count(needle) == 1 and text.count(t.key) == 2  # the needle states it twice, nowhere else
        assert abs(text.index(needle) / (len(text) - len(needle)) - t.depth) < 0.01
        assert "What is the pass key?" in "".join(map(chr, t.question.tolist()))
    assert [t.key for t in passkey_trials(tokenizer, 6, min_context=300, max_context=600, seed=3)] == \
        [t.key for t in trials]


def test_the_once_needle_states_the_key_a_single_time_at_the_same_depth(tokenizer):
    landmark = passkey_trials(tokenizer, 4, min_context=300, max_context=600, seed=3)
    once = passkey_trials(tokenizer, 4, min_context=300, max_context=600, seed=3, needle="once")
    for a, b in zip(landmark, once, strict=True):
        text = "".join(map(chr, b.context.tolist()))
        assert (b.key, b.depth, b.context.numel()) == (a.key, a.depth, a.context.numel())
        assert text.count(NEEDLES["once"].format(key=b.key)) == 1 and text.count(b.key) == 1
    with pytest.raises(ValueError, match="needle must be one of"):
        passkey_trials(tokenizer, 1, needle="twice")


def test_the_repeated_passage_appeared_in_the_context(tokenizer):
    for ex in repeated_passage_windows(tokenizer, 3, context=200, continuation=16):
        ids = ex.ids.tolist()
        assert len(ids) == 200 + 16 + 1
        passage = ids[200:]
        assert any(ids[i : i + 17] == passage for i in range(200 - 16)), "the continuation is not in the context"


def test_exact_match_reads_the_first_digits():
    assert matches_key(" 12345. Remember", "12345")
    assert matches_key(" 12 345", "12345")  # digits split by a space still count
    assert not matches_key(" 1234", "12345") and not matches_key(" 54321 12345", "12345")


def test_eval_passkey_and_repeated_run_end_to_end(tiny_lm_dir, tmp_path, refused):
    out = tmp_path / "pk"
    assert main(["eval", "passkey", "--model", tiny_lm_dir, "--trials", "3", "--min-context", "120",
                 "--max-context", "200", "--ratios", "0.5", "--methods", "quickmerge", "random", "--threads", "1",
                 "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["method"], r["compression_ratio"]): r for r in results["summary"]}
    assert set(rows) == {("none", None), ("quickmerge", 0.5), ("random", 0.5)}
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and len(r["correct_per_trial"]) == 3
    assert out.with_suffix(".png").is_file() and len(results["trials"]) == 3
    out = tmp_path / "rep"
    assert main(["eval", "text", "--task", "repeated", "--model", tiny_lm_dir, "--examples", "2", "--context", "96",
                 "--continuation", "8", "--ratios", "0.5", "--methods", "random", "--threads", "1",
                 "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())["summary"]
    assert {r["method"] for r in summary} == {"none", "random"}
    refused(["eval", "passkey", "--model", tiny_lm_dir, "--min-context", "300", "--max-context", "200"], "min-context")


def test_answered_only_compresses_just_the_trials_the_uncompressed_model_answers(tiny_lm_dir, tmp_path, monkeypatch):
    import quickmerge.eval.retrieval as retrieval

    calls = []

    def fake_answer(model, tokenizer, trial, press, method, new_tokens=16):
        number = int(trial.title.split(":")[0])
        calls.append((number, method.name))
        correct = number % 2 == 0 and (press is None or number == 0)  # trial 0 survives compression, 2 does not
        return {"correct": float(correct), "answer": "", "depth": trial.depth, "context": 0}

    monkeypatch.setattr(retrieval, "answer_passkey", fake_answer)
    args = ["eval", "passkey", "--model", tiny_lm_dir, "--trials", "5", "--min-context", "120", "--max-context",
            "200", "--ratios", "0.5", "--methods", "random", "--threads", "1", "--answered-only", "--out",
            str(tmp_path / "pk")]
    assert main(args) == 0
    assert sorted(calls) == sorted([(i, "none") for i in range(5)] + [(0, "random"), (2, "random"), (4, "random")])
    results = json.loads((tmp_path / "pk.json").read_text())
    extra = results["answered_only"]
    assert extra["trials_answered"] == [0, 2, 4] and extra["uncompressed_accuracy_all_trials"] == pytest.approx(0.6)
    rows = {r["method"]: r for r in results["summary"]}
    assert rows["none"]["correct_per_trial"] == [1.0, 1.0, 1.0]
    assert rows["random"]["correct_per_trial"] == [1.0, 0.0, 0.0]
    calls.clear()
    assert main(args) == 0 and calls == []  # resumed from the journal: nothing computed again


def test_passkey_first_gives_the_later_trials_of_the_same_seed(tokenizer, tiny_lm_dir, tmp_path, monkeypatch, refused):
    import quickmerge.eval.retrieval as retrieval

    whole = passkey_trials(tokenizer, 5, min_context=120, max_context=200, seed=3, needle="once")
    part = passkey_trials(tokenizer, 2, min_context=120, max_context=200, seed=3, needle="once", first=3)
    assert [(t.title, t.key, t.depth) for t in part] == [(t.title, t.key, t.depth) for t in whole[3:]]
    assert all(torch.equal(a.context, b.context) for a, b in zip(part, whole[3:], strict=True))
    with pytest.raises(ValueError, match="first must be"):
        passkey_trials(tokenizer, 1, first=-1)

    calls = []

    def fake_answer(model, tokenizer, trial, press, method, new_tokens=16):
        number = int(trial.title.split(":")[0])
        calls.append((number, method.name))
        return {"correct": float(number % 2 == 0), "answer": "", "depth": trial.depth, "context": 0}

    monkeypatch.setattr(retrieval, "answer_passkey", fake_answer)
    base = ["eval", "passkey", "--model", tiny_lm_dir, "--min-context", "120", "--max-context", "200", "--ratios",
            "0.5", "--methods", "random", "--threads", "1", "--answered-only"]
    assert main([*base, "--trials", "3", "--first", "3", "--out", str(tmp_path / "late")]) == 0
    assert sorted(calls) == [(3, "none"), (4, "none"), (4, "random"), (5, "none")]
    results = json.loads((tmp_path / "late.json").read_text())
    assert results["answered_only"]["trials_answered"] == [4]
    refused([*base, "--trials", "2", "--first", "-1", "--out", str(tmp_path / "x")], "--first must be")


def test_answered_only_refuses_a_model_that_answers_nothing(tiny_lm_dir, tmp_path, refused):
    refused(["eval", "passkey", "--model", tiny_lm_dir, "--trials", "2", "--min-context", "120", "--max-context",
            "160", "--ratios", "0.5", "--methods", "random", "--threads", "1", "--answered-only", "--out",
            str(tmp_path / "pk")], "answers none")  # the tiny random model cannot answer
    refused(["eval", "passkey", "--model", tiny_lm_dir, "--new-tokens", "3"], "new-tokens")


def test_repeated_windows_depend_on_their_number_only_and_never_repeat(tokenizer):
    from quickmerge.eval.retrieval import repeated_window_count

    whole = repeated_passage_windows(tokenizer, 7, context=200, continuation=16)
    part = repeated_passage_windows(tokenizer, 3, context=200, continuation=16, first=4)
    assert [e.title for e in part] == [e.title for e in whole[4:]]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(part, whole[4:], strict=True))
    distinct = repeated_window_count()
    with pytest.raises(ValueError, match="first \\+ count"):
        repeated_passage_windows(tokenizer, 2, context=200, continuation=16, first=distinct - 1)


def test_eval_text_first_scores_the_later_windows_under_their_own_numbers(tiny_lm_dir, tmp_path, refused):
    base = ["eval", "text", "--task", "repeated", "--model", tiny_lm_dir, "--context", "96", "--continuation", "8",
            "--ratios", "0.5", "--methods", "random", "--threads", "1"]
    assert main([*base, "--examples", "4", "--out", str(tmp_path / "all")]) == 0
    assert main([*base, "--examples", "2", "--first", "2", "--out", str(tmp_path / "late")]) == 0

    def nll(name):
        journal = tmp_path / f"{name}.journal"
        rows = [json.loads(line) for f in sorted(journal.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
        return {r["key"]: r["row"]["nll"] for r in rows if "|none|" in r["key"]}

    late, everything = nll("late"), nll("all")
    assert len(late) == 2 and all(k.split("|")[0] in ("2", "3") for k in late)
    assert all(everything[k] == pytest.approx(v) for k, v in late.items())
    refused([*base, "--examples", "2", "--first", "1000", "--out", str(tmp_path / "x")], "--first \\+ --examples")
    refused([*base, "--examples", "2", "--first", "-1", "--out", str(tmp_path / "x")], "--first must be")


def test_later_windows_repeat_a_passage_of_another_article_and_share_no_text(tokenizer):
    from quickmerge.eval.retrieval import later_chunks, repeated_window_count

    later = repeated_passage_windows(tokenizer, 6, context=200, continuation=16, source="later", first=40)
    chunks = later_chunks(tokenizer, 200)
    assert repeated_window_count("later", tokenizer, 200) == len(chunks) > 100
    assert all(part >= 1 and len(ids) == 200 for part, _, ids in chunks)
    assert [c[0] for c in chunks] == sorted(c[0] for c in chunks)  # part by part
    texts = []
    for i, ex in enumerate(later, start=40):
        ids = ex.ids.tolist()
        assert len(ids) == 200 + 16 + 1
        passage = ids[200:]
        assert [i for i in range(200 - 16) if ids[i : i + 17] == passage], "the continuation is not in the context"
        assert ex.title.startswith(f"{i}:") and ex.title.endswith(f"(part {chunks[i][0]})")
        context = ids[:200]
        start = next(j for j in range(200 - 16) if context[j : j + 17] == passage)
        assert context[:start] + context[start + 17 :] == chunks[i][2][:183]  # the filler: the head of chunk i
        texts.append("".join(map(chr, ids)))
    # no 40-byte run of a later window appears in an openings window
    openings = "".join("".join(map(chr, e.ids.tolist())) + "\0"
                       for e in repeated_passage_windows(tokenizer, 104, context=200, continuation=16))
    assert not [t[k : k + 40] for t in texts for k in range(0, len(t) - 40, 20) if t[k : k + 40] in openings]
    same = repeated_passage_windows(tokenizer, 2, context=200, continuation=16, source="later", first=42)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(same, later[2:4], strict=True))
    with pytest.raises(ValueError, match="first \\+ count"):
        repeated_passage_windows(tokenizer, 2, context=200, continuation=16, source="later", first=len(chunks) - 1)
    with pytest.raises(ValueError, match="source must be one of"):
        repeated_passage_windows(tokenizer, 1, source="middle")


def test_eval_text_repeated_later_runs_and_refuses_windows_that_do_not_exist(tiny_lm_dir, tmp_path, refused):
    base = ["eval", "text", "--task", "repeated-later", "--model", tiny_lm_dir, "--context", "96",
            "--continuation", "8", "--ratios", "0.5", "--methods", "random", "--threads", "1"]
    assert main([*base, "--examples", "2", "--first", "5", "--out", str(tmp_path / "later")]) == 0
    result = json.loads((tmp_path / "later.json").read_text())
    assert [t.split(":")[0] for t in result["examples"]] == ["5", "6"] and "(part 1)" in result["examples"][0]
    assert result["config"]["task"] == "repeated-later"
    refused([*base, "--examples", "2", "--first", "10000000", "--out", str(tmp_path / "none")],
            "repeated-later task has windows")
