"""``score_example``'s memory_saved: mean entries per KV head over the full-attention layers, whatever the
layout (rectangular, uneven layers, flat) and whichever press (ours or kvpress's)."""

import pytest
import torch

pytest.importorskip("transformers")

from quickmerge.eval.text import Method, TextExample, score_example
from quickmerge.text import QuickMergePress
from tests.text.tiny import tiny


@pytest.mark.parametrize("options", [{}, {"budget": "entropy"}, {"scoring": "replay", "budget": "replay"},
                                     {"scoring": "replay", "budget": "replay", "head_budgets": True}])
def test_memory_saved_is_the_share_of_entries_removed(options):
    model = tiny("llama", layers=4)
    with torch.no_grad():  # a sharp layer 0, so that the budgets differ between layers
        model.model.layers[0].self_attn.q_proj.weight.mul_(30.0)
    example = TextExample("t", torch.randint(0, 97, (40 + 4 + 1,)))
    method = Method("m", lambda r: QuickMergePress(r, window=8, **options), decode_inside=True)
    out = score_example(model, example, 40, method.make(0.5), method, 0.5)
    assert out["memory_saved"] == pytest.approx(0.5) and out["achieved_ratio"] == pytest.approx(0.5)


def test_memory_saved_counts_only_global_layers_on_gemma3():
    model = tiny("gemma3", layers=4)
    example = TextExample("t", torch.randint(0, 97, (40 + 4 + 1,)))
    method = Method("m", lambda r: QuickMergePress(r), decode_inside=True)
    assert score_example(model, example, 40, method.make(0.75), method, 0.75)["memory_saved"] == pytest.approx(0.75)
    none = score_example(model, example, 40, None, Method("none", lambda r: None))
    assert none["memory_saved"] == pytest.approx(0.0)


@pytest.mark.parametrize("kind", ["phi3", "gemma3-vlm"])
def test_every_supported_class_is_scored_like_its_text_model(kind):
    """The harness reads a vision-language model's text settings (KV heads, layer types) from its text config."""
    model = tiny(kind, layers=4)
    example = TextExample("t", torch.randint(1, 90, (40 + 4 + 1,)))
    method = Method("m", lambda r: QuickMergePress(r), decode_inside=True)
    merged = score_example(model, example, 40, method.make(0.75), method, 0.75)
    none = score_example(model, example, 40, None, Method("none", lambda r: None))
    assert merged["memory_saved"] == pytest.approx(0.75) and none["memory_saved"] == pytest.approx(0.0)
    assert merged["nll"] != none["nll"]
