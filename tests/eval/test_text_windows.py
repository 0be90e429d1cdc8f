"""The Wikipedia windows of ``eval text``: openings first, then later windows of the same articles."""

import pytest
import torch

from quickmerge.data import wikipedia_articles
from quickmerge.eval.text import wikipedia_windows


class BytesTokenizer:
    """One token per UTF-8 byte: deterministic and fast, enough to check how windows are cut."""

    bos_token_id = 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode())}


@pytest.mark.parametrize("bos", [False, True])
def test_openings_come_first_then_the_next_windows_without_overlap(bos):
    tok, context, continuation = BytesTokenizer(), 6000, 100
    need = context + continuation + 1
    body = need - bos
    texts = {a.title: a.text.encode() for a in wikipedia_articles()}
    openings = [t for t, b in texts.items() if len(b) >= body]
    seconds = [t for t, b in texts.items() if len(b) >= 2 * body]
    assert 0 < len(seconds) < len(openings)  # this setting exercises both passes

    windows = wikipedia_windows(tok, len(openings) + 2, context, continuation, bos=bos)
    assert [w.title for w in windows[: len(openings)]] == openings
    assert [w.title for w in windows[len(openings) :]] == [f"{t} (window 2)" for t in seconds[:2]]
    for w in windows:
        assert w.ids.shape == (need,)
        assert (w.ids[0].item() == tok.bos_token_id) == bos
    first, second = windows[openings.index(seconds[0])], windows[len(openings)]
    text = torch.tensor(list(texts[seconds[0]]))
    assert torch.equal(first.ids[bos:], text[:body])
    assert torch.equal(second.ids[bos:], text[body : 2 * body])  # the next tokens, no overlap, no gap
    # asking for fewer windows never changes the first ones
    assert [w.title for w in wikipedia_windows(tok, 3, context, continuation, bos=bos)] == openings[:3]


def test_asking_for_more_windows_than_the_articles_hold_names_the_count():
    with pytest.raises(ValueError, match=r"hold only \d+ windows of 200001 tokens"):
        wikipedia_windows(BytesTokenizer(), 10, 200000, 0)


def test_more_windows_than_the_articles_hold_is_one_line(tiny_lm_dir, tmp_path, refused):
    """``eval text --examples`` past the articles' windows was a ValueError traceback; it is refused in one line."""

    refused(["eval", "text", "--model", tiny_lm_dir, "--examples", "100000000", "--ratios", "0.5",
            "--methods", "random", "--out", str(tmp_path / "res"), "--threads", "1"],
            "^quickmerge eval text: error: the Wikipedia articles hold only")


def _save_tiny_gpt_oss(path) -> str:
    """A 2-layer gpt-oss (attention sinks; no SDPA path, so it loads eager) with the byte-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    from tests.eval.conftest import save_tiny_lm

    save_tiny_lm(path)  # the tokenizer, then the model replaced
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                       num_experts_per_tok=1, max_position_embeddings=512, sliding_window=8,
                                       layer_types=["sliding_attention", "full_attention"])
    transformers.GptOssForCausalLM(config).save_pretrained(path)
    return str(path)


def test_an_eager_only_model_runs_the_per_head_budget_recipes(tmp_path):
    """gpt-oss loads eager: the replay recipes keeping each layer's KV heads in one cache row run on it too."""
    import json

    from quickmerge.cli import main

    path, out = _save_tiny_gpt_oss(tmp_path / "gpt_oss"), tmp_path / "res"
    methods = ["quickmerge-replay", "quickmerge-replay-pooled"]
    assert main(["eval", "text", "--model", path, "--examples", "2", "--context", "64", "--continuation", "8",
                 "--ratios", "0.5", "--methods", *methods, "--out", str(out), "--threads", "1"]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "res.json").read_text())["summary"]}
    for method in methods:  # merged at equal memory, and not a no-op
        assert rows[method]["memory_saved"] == pytest.approx(0.5)
        assert rows[method]["nll_per_example"] != rows["none"]["nll_per_example"]


def test_methods_the_models_attention_cannot_run_are_refused_before_any_example(tiny_lm_dir, tmp_path, refused,
                                                                                 monkeypatch):
    """A model that loads flex attention (no additive float masks; newer transformers read `attn_implementation`
    from config.json): the presses that need one are refused with their names before the first example, not when
    their turn comes."""
    from quickmerge.pretrained import causal_lm

    def load_flex(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.config._attn_implementation_internal = "flex_attention"
        return model, tokenizer

    load, out = causal_lm.load_causal_lm, tmp_path / "res"
    monkeypatch.setattr(causal_lm, "load_causal_lm", load_flex)
    refused(["eval", "text", "--model", tiny_lm_dir, "--examples", "2", "--context", "64", "--continuation", "8",
             "--ratios", "0.5", "--methods", "random", "quickmerge-replay", "quickmerge-replay-pooled",
             "--out", str(out), "--threads", "1"],
            r"--methods: quickmerge-replay, quickmerge-replay-pooled cannot run on LlamaForCausalLM: .*one cache row"
            r".*'flex_attention'")
    assert not list(out.glob("*.json"))  # no example was scored


def test_the_input_press_on_a_model_too_shallow_for_its_layer_is_refused_before_any_example(tiny_lm_dir, tmp_path,
                                                                                             refused):
    """The input press merges after layer 4 by default: on a 2-layer model it is refused up front, by name."""
    out = tmp_path / "res"
    refused(["eval", "text", "--model", tiny_lm_dir, "--examples", "2", "--context", "64", "--continuation", "8",
             "--ratios", "0.5", "--methods", "random", "quickmerge-input", "--out", str(out), "--threads", "1"],
            r"--methods: quickmerge-input cannot run on LlamaForCausalLM: layer must be below the last decoder "
            r"layer \(1\) of LlamaForCausalLM, got 4")
    assert not list(out.glob("*.json"))
