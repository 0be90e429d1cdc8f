"""The ``transformers_free`` mark (tests/conftest.py): what its guard catches, and the second run leaving it out."""

import os
import subprocess
import sys

import pytest

from tests.conftest import FREE, _TransformersGuard
from tests.launch import IMPORT_LOG, child_env

transformers = pytest.importorskip("transformers")


def test_the_guard_sees_a_built_config_and_a_child_s_import_and_restores_everything(tmp_path):
    classes = (transformers.PretrainedConfig, transformers.PreTrainedModel)
    watched = [(cls, method, vars(cls).get(method)) for cls in classes for method in ("__init__", "__post_init__")]
    finders = list(sys.meta_path)
    (tmp_path / "log").touch()  # as the setup hook makes it
    guard = _TransformersGuard(tmp_path / "log")
    transformers.LlamaConfig(num_hidden_layers=1)
    subprocess.run([sys.executable, "-c", "import tokenizers"], env=child_env(), check=True)
    subprocess.run([sys.executable, "-c", "import numpy"], env=child_env(), check=True)  # not watched
    seen = list(dict.fromkeys(guard.close()))  # a config's __init__ and __post_init__ may both report it
    assert seen[0] == "built a LlamaConfig" and len(seen) == 2 and seen[1].startswith("a child imported tokenizers")
    assert all(vars(cls).get(method) is before for cls, method, before in watched)  # restored, or still inherited
    assert sys.meta_path == finders and IMPORT_LOG not in os.environ
    transformers.LlamaConfig(num_hidden_layers=1)  # closed: nothing recorded any more
    assert list(dict.fromkeys(guard.seen)) == seen


def test_the_guard_sees_typer_which_the_second_run_counts_with_transformers(tmp_path):
    from tests.newest_scope import FAMILY

    pytest.importorskip("typer")
    assert "typer" in FAMILY  # the second run may skip the marked tests when typer alone changed, because:
    (tmp_path / "log").touch()
    guard = _TransformersGuard(tmp_path / "log")
    subprocess.run([sys.executable, "-c", "import typer"], env=child_env(), check=True)
    seen = guard.close()
    assert len(seen) == 1 and seen[0].startswith("a child imported typer")


def test_the_second_run_deselects_the_marked_tests_alone():
    from types import SimpleNamespace

    from tests.conftest import pytest_collection_modifyitems

    def item(marked: bool) -> SimpleNamespace:
        return SimpleNamespace(get_closest_marker=lambda name: name if marked and name == FREE else None)

    items = [item(True), item(False), item(True), item(False)]
    for only, kept in ((False, items), (True, items[1::2])):
        deselected = []
        hook = SimpleNamespace(pytest_deselected=lambda items, out=deselected: out.extend(items))
        config = SimpleNamespace(getoption=lambda name, only=only: {"--transformers-only": only}[name], hook=hook)
        run = list(items)
        pytest_collection_modifyitems(config, run)
        assert run == kept and deselected == ([] if not only else items[::2])
