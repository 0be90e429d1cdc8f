import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("kvpress")

from quickmerge.eval.text_methods import build_method  # noqa: E402


def tiny_gemma3():
    """Sliding, global, sliding: kvpress should compress only the middle layer."""
    config = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, head_dim=16, sliding_window=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return transformers.Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("name", ["kvpress-knorm", "kvpress-expected-attention"])
def test_kvpress_presses_leave_gemma3_sliding_layers_alone(name):
    torch.manual_seed(0)
    model = tiny_gemma3()
    press = build_method(name).make(0.5)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(torch.randint(0, 97, (1, 40)), past_key_values=cache)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [40, 20, 40], lengths
    assert not any(hasattr(m, "None_inv_freq") for m in model.modules())


def test_scoring_after_a_global_layers_press_is_causal_and_runs():
    from quickmerge.eval.text import _masks_for_shortened_layers

    torch.manual_seed(0)
    model = tiny_gemma3()
    ctx, cont = torch.randint(0, 97, (1, 40)), torch.randint(0, 97, (1, 8))
    changed = cont.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 97
    outs = []
    for c in (cont, changed):
        cache = transformers.DynamicCache()
        with torch.no_grad():
            with build_method("kvpress-knorm").make(0.5)(model):
                model.model(input_ids=ctx, past_key_values=cache)
            assert [layer.keys.shape[2] for layer in cache.layers] == [40, 20, 40]
            with _masks_for_shortened_layers(model, cache):
                outs.append(model(input_ids=c, past_key_values=cache, position_ids=torch.arange(40, 48)[None]).logits)
    assert torch.allclose(outs[0][:, :-1], outs[1][:, :-1], atol=1e-5)  # a later token never leaks backwards
    assert not torch.allclose(outs[0][:, -1], outs[1][:, -1])
