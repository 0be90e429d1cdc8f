"""``./run.sh test`` runs the suite in pytest-xdist workers: the ``transformers_free`` guard holds in each worker, and
the workers share the cores instead of oversubscribing them."""

import subprocess
import sys

import pytest

from tests.conftest import FREE, threads_per_test
from tests.launch import child_env


@pytest.mark.parametrize(("workers", "cores", "threads"), [(None, 2, 2), (None, 1, 1), ("2", 2, 1), ("2", 8, 2),
                                                           ("4", 2, 1)])
def test_each_worker_takes_its_share_of_the_cores(monkeypatch, workers, cores, threads):
    if workers is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert threads_per_test() == threads


def test_the_guard_fails_a_marked_test_inside_an_xdist_worker(tmp_path):
    # one worker: a worker process is what differs from the plain run (two would double the start-up alone)
    pytest.importorskip("xdist")
    pytest.importorskip("transformers")
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F403  (the suite's hooks)\n")
    (tmp_path / "test_marked_import.py").write_text(
        f"import pytest\npytestmark = pytest.mark.{FREE}\n\ndef test_imports():\n    import transformers  # noqa\n")
    (tmp_path / "test_marked_clean.py").write_text(
        f"import pytest\npytestmark = pytest.mark.{FREE}\n\ndef test_clean():\n    assert True\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "1", "-q",
                             "-o", "addopts=", "--rootdir", str(tmp_path), str(tmp_path)],
                            cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "2 passed, 1 error" in out, out  # both calls pass; the guard errors the importing one at its teardown
    assert "[gw0]" in out and "ERROR test_marked_import.py::test_imports" in out, out  # inside the worker
    assert f"marked {FREE}, but: imported transformers" in out, out
