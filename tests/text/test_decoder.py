"""``quickmerge.text.decoder``: what the presses tell a user whose model is not among the tested architectures."""

import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from quickmerge.text import SUPPORTED_ARCHITECTURES, QuickMergePress  # noqa: E402
from quickmerge.text.decoder import UnsupportedAttentionError, architecture_hint  # noqa: E402
from tests.text.tiny import COMMON, tiny  # noqa: E402


def _named(name: str, base: type = nn.Module) -> nn.Module:
    return type(name, (base,), {})()


def test_the_hint_names_the_nearest_tested_classes_not_all_of_them():
    hint = architecture_hint(_named("Qwen3ForCausalLm"))  # a class of another library, near a tested name
    assert "Qwen3ForCausalLM" in hint.split("nearest by name: ")[1]
    assert f"{len(SUPPORTED_ARCHITECTURES)} tested architectures in quickmerge.text.SUPPORTED_ARCHITECTURES" in hint
    assert len(hint) < 200 and "LlamaForCausalLM" not in hint
    assert "nearest" not in architecture_hint(_named("Zyxwvut"))
    assert architecture_hint(_named("LlamaForCausalLM")).startswith("LlamaForCausalLM is one of the")


def test_a_subclass_of_a_tested_class_is_told_which_one():
    base = type(tiny("llama"))
    model = type("MyLlama", (base,), {})(base.config_class(**COMMON)).eval()
    with pytest.warns(UserWarning) as record, QuickMergePress(0.5)(model), torch.no_grad():
        model(torch.randint(0, 97, (1, 12)))
    (message,) = [str(w.message) for w in record if "untested" in str(w.message)]
    assert message.startswith("QuickMergePress is untested on MyLlama")
    assert "MyLlama subclasses LlamaForCausalLM, one of the" in message and len(message) < 400


def test_a_refusal_names_where_the_tested_architectures_are_without_listing_them():
    model = transformers.DiffLlamaForCausalLM(transformers.DiffLlamaConfig(**COMMON)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # untested on DiffLlama: the warning is the test above's
        with pytest.raises(UnsupportedAttentionError) as caught, QuickMergePress(0.5)(model):
            pass
    message = str(caught.value)
    assert "quickmerge.text.SUPPORTED_ARCHITECTURES" in message and "MistralForCausalLM" not in message
