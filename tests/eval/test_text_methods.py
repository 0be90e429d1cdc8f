import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("kvpress")

from quickmerge.eval.text_methods import build_method  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from tests.eval.conftest import require_usable_kvpress  # noqa: E402


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
    require_usable_kvpress()
    torch.manual_seed(0)
    model = tiny_gemma3()
    press = build_method(name).make(0.5)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(torch.randint(0, 97, (1, 40)), **cache_kwargs(model, cache))
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [40, 20, 40], lengths
    assert not any(hasattr(m, "None_inv_freq") for m in model.modules())


def test_scoring_after_a_global_layers_press_is_causal_and_runs():
    require_usable_kvpress()
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
                model.model(input_ids=ctx, **cache_kwargs(model, cache))
            assert [layer.keys.shape[2] for layer in cache.layers] == [40, 20, 40]
            with _masks_for_shortened_layers(model, cache):
                positions = torch.arange(40, 48)[None]
                outs.append(model(input_ids=c, **cache_kwargs(model, cache), position_ids=positions).logits)
    assert torch.allclose(outs[0][:, :-1], outs[1][:, :-1], atol=1e-5)  # a later token never leaks backwards
    assert not torch.allclose(outs[0][:, -1], outs[1][:, -1])


@pytest.fixture
def transformers_release(monkeypatch):
    """Pretend the installed transformers is another release (kvpress declares the ones it supports)."""
    from importlib import metadata

    from quickmerge.eval import text_methods

    real = metadata.version

    def pretend(version: str) -> None:
        monkeypatch.setattr(metadata, "version", lambda name: version if name == "transformers" else real(name))
        text_methods.kvpress_incompatibility.cache_clear()

    yield pretend
    text_methods.kvpress_incompatibility.cache_clear()


def test_kvpress_outside_the_transformers_it_supports_is_refused_and_left_out_of_the_defaults(transformers_release):
    from quickmerge.errors import IncompatibleExtraError
    from quickmerge.eval.text_methods import KVPRESS, OURS, default_methods, kvpress_incompatibility

    transformers_release("99.0.0")
    assert "transformers 99.0.0 is installed" in kvpress_incompatibility()
    with pytest.raises(IncompatibleExtraError, match=r"kvpress-snapkv: kvpress .* supports transformers <"):
        build_method("kvpress-snapkv")
    assert build_method("quickmerge").make(0.5) is not None  # ours run on any release
    with pytest.warns(UserWarning, match="kvpress's presses are left out"):
        assert default_methods() == OURS
    transformers_release(transformers.__version__)  # the release kvpress runs with in this environment
    if kvpress_incompatibility() is None:
        assert default_methods() == OURS + KVPRESS


def test_eval_text_refuses_an_unsupported_kvpress_in_one_line_before_loading_the_model(
        transformers_release, monkeypatch, tmp_path, capsys):
    from quickmerge.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded first")

    monkeypatch.setattr("quickmerge.pretrained.causal_lm.load_causal_lm", no_model)
    transformers_release("99.0.0")
    code = main(["eval", "text", "--methods", "quickmerge", "kvpress-snapkv", "--examples", "2",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "transformers 99.0.0" in err and "Traceback" not in err, err


def test_a_press_the_installed_kvpress_lacks_is_refused_before_any_work(monkeypatch):
    require_usable_kvpress()
    import kvpress

    from quickmerge.errors import IncompatibleExtraError

    monkeypatch.delattr(kvpress, "CapPress")  # kvpress 0.5.0-0.5.3 have no CapPress nor MergingPress
    with pytest.raises(IncompatibleExtraError, match=r"kvpress-cap needs a press that kvpress .*CapPress"):
        build_method("kvpress-cap")
