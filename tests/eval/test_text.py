"""``run_text_eval``, ``prefilled`` and ``score_example``: rows independent of run order; what the prefill time covers;
hybrid models."""

from types import SimpleNamespace

import pytest
import torch

from quickmerge.eval.text import Method, run_text_eval


def _draws(methods: list[Method], examples: list, ratios: list[float], numbers: list[int]) -> dict:
    def scorer(example, press, method, ratio):
        return {"draw": float(torch.rand(()))}  # as kvpress's LeverageScore sketch draws from the global generator

    return run_text_eval(None, examples, methods, ratios, 0, progress=False, scorer=scorer,
                         summary=lambda examples, per_run: per_run, indices=numbers)


def test_a_row_draws_the_same_numbers_whatever_ran_before_it():
    examples = [SimpleNamespace(title=f"w{i}") for i in range(3)]
    a, b = Method("a", make=lambda ratio: None), Method("b", make=lambda ratio: None)
    first = _draws([a, b], examples, [0.5, 0.75], [0, 1, 2])
    torch.rand(5)  # another history of the global generator
    swapped = _draws([b, a], examples[::-1], [0.75, 0.5], [2, 1, 0])  # the same rows, run in another order
    for (name, ratio), rows in first.items():
        assert [r["draw"] for r in rows] == [r["draw"] for r in swapped[(name, ratio)]][::-1]
    alone = _draws([b], examples[1:2], [0.75], [1])  # one row on its own, as a resumed run would compute it
    assert alone[("b", 0.75)][0]["draw"] == first[("b", 0.75)][1]["draw"]
    draws = [r["draw"] for rows in first.values() for r in rows]
    assert len(set(draws)) == len(draws)  # and different rows draw differently


def test_the_prefill_time_includes_work_a_press_does_when_it_exits(tiny_lm_dir):
    """kvpress's KVzip scores and compresses when its press exits: that is prefill time, not untimed."""
    import contextlib
    import time

    import transformers

    from quickmerge.eval.text import prefilled

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    ids = torch.randint(0, 256, (1, 16))
    compressed_on_exit = []

    @contextlib.contextmanager
    def press(model):
        yield
        time.sleep(0.3)  # the scoring pass a press may run on exit
        compressed_on_exit.append(True)

    with torch.no_grad(), prefilled(model, ids, press, Method("exits-late", make=lambda r: press)) as state:
        assert compressed_on_exit  # the press has finished before decoding starts
    assert state.prefill_s >= 0.3


@pytest.mark.parametrize("kind", ["lfm2", "granite4", "falcon-h1"])
def test_a_hybrid_model_is_scored_with_its_attention_layers_compressed(kind):
    """LFM2 (convolutions), Granite 4 (Mamba 2, attention without position embedding), Falcon-H1 (Mamba 2 beside the
    attention): the harness lays out their cache from the config, counts the entries of the attention layers only,
    scores ratio 0 as no compression and 0.5 with half of each attention layer kept."""
    transformers = pytest.importorskip("transformers")
    from quickmerge.eval.text import NO_COMPRESSION, TextExample, score_example
    from quickmerge.eval.text_methods import build_method
    from quickmerge.text.cache import own_cache_class
    from quickmerge.text.decoder import base_model
    from tests.text.tiny import tiny

    model = tiny(kind)
    if own_cache_class(base_model(model)) is not None:
        pytest.skip(f"transformers {transformers.__version__} keeps hybrid models' states in a cache of their own")
    example = TextExample(title="t", ids=torch.randint(1, 90, (41,), generator=torch.Generator().manual_seed(0)))
    method = build_method("quickmerge")
    with torch.no_grad():
        plain = score_example(model, example, 32, None, NO_COMPRESSION)
        zero = score_example(model, example, 32, method.make(0.0), method, 0.0)
        half = score_example(model, example, 32, method.make(0.5), method, 0.5)
    assert plain["memory_saved"] == zero["memory_saved"] == 0.0
    assert zero["nll"] == pytest.approx(plain["nll"], abs=1e-5)
    assert half["memory_saved"] == pytest.approx(0.5)
    assert half["nll"] != pytest.approx(plain["nll"], abs=1e-4)


def test_no_compression_is_scored_on_a_model_the_presses_refuse():
    """The harness asks nothing of the decoder's layers beyond what it runs: DeepSeek V3 (latent attention, which the
    presses refuse) is scored without compression, as kvpress's presses or a plain model need it to be."""
    transformers = pytest.importorskip("transformers")
    from quickmerge.eval.text import NO_COMPRESSION, TextExample, score_example

    torch.manual_seed(0)
    config = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        first_k_dense_replace=1, max_position_embeddings=64, pad_token_id=0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    example = TextExample(title="t", ids=torch.randint(1, 90, (41,), generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        row = score_example(model, example, 32, None, NO_COMPRESSION)
        logits = model(example.ids[None, :-1]).logits[0, 32:]
    assert row["memory_saved"] == 0.0
    assert row["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, example.ids[33:]).item(), abs=1e-4)


@pytest.mark.parametrize("tower", ["sdpa", "eager"])
def test_a_method_reading_attention_weights_switches_the_decoder_alone_and_restores_it(tower):
    """kvpress's observed-attention presses need eager weights from the decoder: on a vision-language model whose
    decoder runs SDPA the prefill runs the decoder eager and leaves the tower's implementation alone, and afterwards
    every config says what it said (the model-wide setter would switch the tower too, then restore one for all)."""
    pytest.importorskip("transformers")
    from quickmerge.eval.text import Method, prefilled
    from quickmerge.text.decoder import attention_of, decoder_layers
    from tests.text.tiny_vlm import vision_language

    model = vision_language("llava").model
    model.set_attn_implementation({"text_config": "sdpa", "vision_config": tower})
    configs = (model.config, model.config.text_config, model.config.vision_config)
    before = [c._attn_implementation for c in configs]
    seen = []
    handle = attention_of(decoder_layers(model)[0]).register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(module.config._attn_implementation), with_kwargs=True)
    reading = Method("reads-weights", make=lambda ratio: None, eager=True)
    with torch.no_grad(), prefilled(model, torch.randint(3, 90, (1, 12)), None, reading):
        assert model.config.vision_config._attn_implementation == tower
    handle.remove()
    assert seen == ["eager"]
    assert [c._attn_implementation for c in configs] == before
