"""run.sh, the README's set-up command: it must stop before installing when the disk cannot hold .venv; its second
test run leaves out the marked tests only when it changes nothing they meet (tests/newest_scope.py)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def _fake_df(bin_dir: Path, free_kib: int) -> None:
    """A ``df -Pk`` that reports ``free_kib`` KiB available, ahead of the real one on PATH."""
    script = bin_dir / "df"
    script.write_text(
        "#!/bin/sh\n"
        "echo 'Filesystem 1024-blocks Used Available Capacity Mounted on'\n"
        f"echo '/dev/fake 100000000 1 {free_kib} 99% /'\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.mark.skipif(shutil.which("bash") is None, reason="run.sh is a bash script")
@pytest.mark.parametrize(("free_gib", "refused"), [(3.2, True), (6.9, True), (7.5, False)])
def test_set_up_stops_before_installing_on_a_full_disk(tmp_path: Path, free_gib: float, refused: bool) -> None:
    for name in ("run.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_df(bin_dir, int(free_gib * 1024 * 1024))
    # With room enough, the script goes on to create the venv: a python3 that fails there stops it at once.
    (bin_dir / "python3").write_text("#!/bin/sh\ncase \"$*\" in *'-m venv'*) echo 'venv reached' >&2; exit 9;; esac\n"
                                     f"exec {shutil.which('python3')} \"$@\"\n")
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "run.sh", "demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    if refused:
        assert f"only {free_gib:.1f} GiB free" in done.stderr and "needs about 7 GiB" in done.stderr
        assert "venv reached" not in done.stderr
    else:
        assert "GiB free" not in done.stderr.split("venv reached")[0]
        assert "venv reached" in done.stderr
    assert not (tmp_path / ".venv").exists()


def _site(root: Path, *dists: str) -> str:
    """A site-packages directory holding the distributions ``name==version`` (their metadata only)."""
    for dist in dists:
        name, version = dist.split("==")
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return str(root)


def test_the_second_run_leaves_out_the_marked_tests_only_when_it_changes_transformers_family_alone(tmp_path, capsys):
    from tests.newest_scope import main, other_overrides

    family_only = _site(tmp_path / "a", "transformers==99.0", "huggingface_hub==99.0", "kernels==99.0",
                        "typer==99.0", "a_package_only_the_newest_needs==1.0")
    assert other_overrides(family_only) == []
    assert main([family_only]) == 0
    out = capsys.readouterr()  # pytest-xdist's summary does not count the deselected tests: the script says it
    assert out.out.strip() == "--transformers-only" and "marked transformers_free ran once, above" in out.err
    with_numpy = _site(tmp_path / "b", "transformers==99.0", "numpy==99.0", "PyYAML==99.0")
    assert other_overrides(with_numpy) == ["numpy", "pyyaml"]  # what .venv has too; names compared canonically
    assert main([with_numpy]) == 0
    out = capsys.readouterr()
    assert out.out == "" and "numpy, pyyaml: the whole suite runs there again" in out.err


def _fake(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None, reason="run.sh needs bash")
@pytest.mark.parametrize("workers", [None, "3", "0", "two"])
def test_both_test_runs_get_the_workers_and_the_caller_s_arguments(tmp_path: Path, workers: str | None) -> None:
    for name in ("run.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    stamp = subprocess.run("cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1", shell=True, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    # an installed .venv / .venv-newest whose interpreters log their arguments: -c prints a site-packages directory,
    # tests/newest_scope.py its selection
    site = tmp_path / "site"
    site.mkdir()
    python = (f'echo "$0 $*" >> {tmp_path}/calls\ncase "$1" in -c) echo {site} ;; '
              'tests/newest_scope.py) echo --transformers-only ;; esac\n')
    for venv in (".venv", ".venv-newest"):
        _fake(tmp_path / venv / "bin" / "python", python)
    _fake(tmp_path / ".venv" / "bin" / "ruff", "exit 0\n")
    if workers != "two":  # installed; else the refusal must come before any installing
        (tmp_path / ".venv" / ".quickmerge-installed").write_text(stamp)
    env = {**os.environ, "QUICKMERGE_FASHION_MNIST": str(tmp_path), "QUICKMERGE_VIDEO_DIR": str(tmp_path)}
    env.pop("QUICKMERGE_TEST_WORKERS", None)
    if workers is not None:
        env["QUICKMERGE_TEST_WORKERS"] = workers
    done = subprocess.run(["bash", "run.sh", "test", "-x", "tests/a.py"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    if workers == "two":  # refused before any test runs
        assert done.returncode == 2 and "QUICKMERGE_TEST_WORKERS: expected a number of workers (0 or more), got " \
            "'two'" in done.stderr
        calls = tmp_path / "calls"
        assert not calls.exists() and "installing" not in done.stderr
        return
    assert done.returncode == 0, done.stderr
    n = workers if workers is not None else str(len(os.sched_getaffinity(0)))
    runs = [line.split(" ", 1) for line in (tmp_path / "calls").read_text().splitlines() if " -m pytest " in line]
    assert [(Path(exe).parts[-3], args) for exe, args in runs] == [
        (".venv", f"-m pytest -n {n} --dist loadfile -x tests/a.py"),
        (".venv-newest", f"-m pytest -p no:cacheprovider -n {n} --dist loadfile --transformers-only -x tests/a.py")]
