"""``eval text``'s command line: what it refuses before the first example, and what it runs on eager-only models."""

import pytest
import torch


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


def test_default_methods_a_model_cannot_run_are_left_out_with_the_reason():
    """Not asked for by name, the input press on a 2-layer model is left out of the defaults with a warning."""
    transformers = pytest.importorskip("transformers")
    from quickmerge.errors import UsageError
    from quickmerge.eval.text_cli import methods_the_model_can_run
    from quickmerge.eval.text_methods import build_method

    config = transformers.LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    methods = [build_method(n) for n in ("random", "quickmerge-input", "quickmerge")]
    with pytest.warns(UserWarning, match=r"quickmerge-input left out of the default methods: layer must be below"):
        kept = methods_the_model_can_run(model, methods, 0.5, chosen=False)
    assert [m.name for m in kept] == ["random", "quickmerge"]
    with pytest.raises(UsageError, match=r"--methods: quickmerge-input cannot run on LlamaForCausalLM"):
        methods_the_model_can_run(model, methods, 0.5, chosen=True)
    assert methods_the_model_can_run(model, methods[::2], 0.5, chosen=True) == methods[::2]
