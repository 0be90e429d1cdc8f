"""A journal refuses rows computed by other code or settings: a run resumed across a change of quickmerge (a new
default, say) starts over only when told (``--fresh``)."""

import argparse

import pytest

from quickmerge.eval.journal import ConfigMismatchError, Journal, code_fingerprint

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_rows_written_by_other_code_are_refused_until_fresh(tmp_path):
    out = tmp_path / "run"
    first = Journal(out, {"protocol": "vision", "code": "0123456789abcdef"})
    assert first.open() == {}
    first.add("quickmerge|16|", {"accuracy": 0.9})
    with pytest.raises(ConfigMismatchError, match=r"\(code: .*--fresh"):
        Journal(out, {"protocol": "vision", "code": code_fingerprint()}).open()
    assert Journal(out, {"protocol": "vision", "code": "0123456789abcdef"}).open() == {
        "quickmerge|16|": {"accuracy": 0.9}}  # the same code resumes
    assert Journal(out, {"protocol": "vision", "code": code_fingerprint()}, fresh=True).open() == {}


def test_code_fingerprint_reads_quickmerges_source(monkeypatch, tmp_path):
    import quickmerge.eval.journal as journal

    before = code_fingerprint()
    assert len(before) == 16 and code_fingerprint() == before  # stable between calls
    package = tmp_path / "quickmerge"
    (package / "eval").mkdir(parents=True)
    (package / "vision.py").write_text("DEFAULT = 'keys'\n")
    monkeypatch.setattr(journal, "__file__", str(package / "eval" / "journal.py"))
    old = code_fingerprint()
    (package / "vision.py").write_text("DEFAULT = 'hidden'\n")  # one default changed
    assert code_fingerprint() != old != before


def test_the_vision_eval_journal_records_the_code():
    pytest.importorskip("safetensors")
    from quickmerge.eval.vision_cli import journal_config

    args = argparse.Namespace(checkpoint=None, images=16, batch_size=8, timing="together", timing_rounds=None,
                              threads=1, dtype="float32")
    assert journal_config(args)["code"] == code_fingerprint()
