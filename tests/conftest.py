import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tests.launch import IMPORT_LOG, WATCHED

# ./run.sh test runs the suite twice: on the pinned releases, then with the newest transformers and what pip upgrades
# or adds with it. A file marked ``pytestmark = pytest.mark.transformers_free`` builds nothing of transformers or
# tokenizers (no config, model, tokenizer or processor) and starts no child that imports them, so when the second
# environment changes nothing else (tests/newest_scope.py decides) that run (``--transformers-only``) leaves it out.
# Every run that includes such a test checks the mark: the test errors if it builds one, imports either package for
# the first time, or starts a child through tests.launch.child_env that imports either (unless the child's
# PYTHONPATH puts a sitecustomize of its own first: Python runs only the first).
FREE = "transformers_free"


def pytest_addoption(parser):
    parser.addoption("--transformers-only", action="store_true",
                     help=f"leave out the tests marked {FREE} (./run.sh test's run on the newest transformers)")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{FREE}: builds nothing of transformers or tokenizers and imports none of "
                            f"{', '.join(WATCHED)}, nor do its children (left out by --transformers-only)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--transformers-only"):
        free = [item for item in items if item.get_closest_marker(FREE)]
        config.hook.pytest_deselected(items=free)
        items[:] = [item for item in items if not item.get_closest_marker(FREE)]


class _TransformersGuard:
    """While a ``transformers_free`` test runs: what of transformers / tokenizers it built or imported, in this process
    and in its children."""

    def __init__(self, log_path):
        self.seen: list[str] = []
        self.log_path = log_path
        self.restore: list = []
        if "transformers" in sys.modules:  # built objects; a first import is caught below
            from transformers import (  # top-level names: stable across releases
                ImageProcessingMixin,
                PretrainedConfig,
                PreTrainedModel,
                PreTrainedTokenizerBase,
                ProcessorMixin,
            )

            for cls in (PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, ImageProcessingMixin,
                        ProcessorMixin):
                self._watch(cls, "__init__")
            if "__post_init__" in PretrainedConfig.__dict__:  # configs as dataclasses: each class its own __init__
                self._watch(PretrainedConfig, "__post_init__")
        sys.meta_path.insert(0, self)
        self.restore.append(lambda: sys.meta_path.remove(self))
        os.environ[IMPORT_LOG] = str(log_path)
        self.restore.append(lambda: os.environ.pop(IMPORT_LOG, None))

    def _watch(self, cls, method: str) -> None:
        original = cls.__dict__.get(method)
        inherited = getattr(cls, method)

        @functools.wraps(inherited)
        def call(obj, *args, **kwargs):
            self.seen.append(f"built a {type(obj).__name__}")
            return inherited(obj, *args, **kwargs)

        setattr(cls, method, call)
        self.restore.append(lambda: setattr(cls, method, original) if original else delattr(cls, method))

    def find_spec(self, name, path=None, target=None):
        if name in WATCHED:
            self.seen.append(f"imported {name}")
        return None  # the regular finders import it

    def close(self) -> list[str]:
        for undo in reversed(self.restore):
            undo()
        self.seen += [f"a child imported {line}" for line in self.log_path.read_text().splitlines()]
        self.log_path.unlink()
        return self.seen


_GUARD = pytest.StashKey[_TransformersGuard]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker(FREE):  # before the test's fixtures are set up
        handle, name = tempfile.mkstemp(prefix="quickmerge-imports-")
        os.close(handle)
        item.stash[_GUARD] = _TransformersGuard(Path(name))
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        guard = item.stash.get(_GUARD, None)
        if guard is not None:
            del item.stash[_GUARD]
            seen = guard.close()
            if seen:
                pytest.fail(f"marked {FREE}, but: {'; '.join(dict.fromkeys(seen))}. Remove the mark (the file's "
                            "pytestmark) so that the run on the newest transformers includes it", pytrace=False)


def write_clip(path, frames: torch.Tensor) -> None:
    """uint8 grey frames ``[T, H, W]`` written as an MJPG clip at ``path``, as a camera's file would be read."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (frames.shape[2], frames.shape[1]))
    for f in frames:
        writer.write(cv2.cvtColor(f.numpy(), cv2.COLOR_GRAY2BGR))
    writer.release()


def threads_per_test() -> int:
    """torch threads per test: two, or this process's share of the cores when pytest-xdist runs workers side by side
    (``./run.sh test``: one per core), so that the workers do not oversubscribe the cores."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(2, cores // workers))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(threads_per_test())
    yield


# torch.compile's backend for tests whose point is tracing (no graph break under ``fullgraph=True``, guards that
# follow the handle) and whose numbers are compared with eager: dynamo, then AOTAutograd's functionalisation with
# inductor's decompositions and partitioner, without inductor's C++ code generation (a clean machine's empty
# inductor cache made each such test cost 16-48 s). Inductor itself compiles one timm and one Hugging Face model.
TRACING = "aot_eager_decomp_partition"


def naive_group_means(x: torch.Tensor, mass: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Reference weighted means with explicit loops (tests only)."""
    b, _, d = x.shape
    out = torch.zeros(b, k, d, dtype=torch.float64)
    for i in range(b):
        for g in range(k):
            members = assignment[i] == g
            w = mass[i][members].double()
            out[i, g] = (w[:, None] * x[i][members].double()).sum(0) / w.sum()
    return out


def tokens_on_grid(tokens: torch.Tensor, source: torch.Tensor, prefix: int, side: int) -> torch.Tensor:
    """Patch tokens ``[B, n, C]`` as a map ``[B, C, side, side]``, each patch the token the source map
    ``[B, prefix + side * side]`` (indices among all tokens) sends it to (tests only)."""
    index = (source[:, prefix:] - prefix)[..., None].expand(-1, -1, tokens.shape[-1])
    return tokens.gather(1, index).unflatten(1, (side, side)).permute(0, 3, 1, 2)


@pytest.fixture
def refused(capsys):
    """``refused(argv, pattern)``: ``quickmerge argv`` exits with status 2, its last line on stderr
    ``quickmerge <command>: error: ...`` matching the regular expression ``pattern``; returns that line."""
    import re

    from quickmerge.cli import main

    def check(argv: list[str], pattern: str) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        line = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # after any progress bar of a model loading
        assert re.match(r"quickmerge [a-z -]+: error: ", line), line
        assert re.search(pattern, line), line
        return line

    return check


def alive_after_call(norm: torch.nn.Module, call) -> list:
    """Run ``call()``; return the input and output tensors of every ``norm`` call in it that are still alive after it
    returned and its result was dropped (a patched model should hold none of them between calls)."""
    import weakref

    seen = []
    hook = norm.register_forward_hook(lambda _m, args, out: seen.extend([weakref.ref(args[0]), weakref.ref(out)]))
    try:
        call()
    finally:
        hook.remove()
    assert seen, "the norm never ran"
    return [ref() for ref in seen if ref() is not None]
