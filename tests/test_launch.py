"""The helpers for tests that start processes (tests/launch.py)."""

import subprocess
import sys

from tests.launch import ROOT, child_env


def test_a_child_process_sees_the_repository_and_the_run_s_own_overlay(tmp_path, monkeypatch):
    """A release overlaid on the environment through PYTHONPATH (as .ci/release_matrix.py and the newest torch's
    check run the tests) is what a test's child process imports too, after the repository."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "overlaid_release.py").write_text("NAME = 'overlay'\n")
    monkeypatch.setenv("PYTHONPATH", str(overlay))
    code = "import overlaid_release, quickmerge; print(overlaid_release.NAME, quickmerge.__file__)"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "overlay" and out[1].startswith(str(ROOT))
    assert child_env(TQDM_DISABLE="1")["TQDM_DISABLE"] == "1"
