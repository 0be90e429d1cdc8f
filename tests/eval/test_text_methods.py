import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("kvpress")

from quickmerge.eval.text_methods import build_method  # noqa: E402


def test_kvpress_presses_leave_gemma3_sliding_layers_alone():
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, head_dim=16, sliding_window=64,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = transformers.Gemma3ForCausalLM(config).eval()
    press = build_method("kvpress-knorm").make(0.5)
    cache = transformers.DynamicCache(config=config)
    with torch.no_grad(), press(model):
        model(torch.randint(0, 97, (1, 40)), past_key_values=cache)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [40, 20, 40], lengths
