"""Derived files (converted models, parsed text) are written whole or rebuilt, never half-read."""

import json
import os
import subprocess
import sys
import time

import pytest

from quickmerge import _cache as cache
from quickmerge._cache import MANIFEST, built_dir


def _build(calls):
    def build(tmp):
        calls.append(tmp)
        (tmp / "weights.bin").write_bytes(b"x" * 1000)
        (tmp / "config.json").write_text("{}")

    return build


def test_built_once_then_reused(tmp_path, capsys):
    calls = []
    path = built_dir(tmp_path / "model", _build(calls), "the test model", "v1")
    assert built_dir(tmp_path / "model", _build(calls), "the test model", "v1") == path
    assert len(calls) == 1 and calls[0] != path  # built elsewhere, then renamed into place
    assert json.loads((path / MANIFEST).read_text())["files"] == {"config.json": 2, "weights.bin": 1000}
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage", ["truncate", "delete", "no-manifest", "old-version"])
def test_a_damaged_directory_is_rebuilt_with_one_line(tmp_path, capsys, damage):
    calls = []
    path = built_dir(tmp_path / "model", _build(calls), "the test model", "v1")
    if damage == "truncate":
        (path / "weights.bin").write_bytes(b"x" * 10)
    elif damage == "delete":
        (path / "config.json").unlink()
    elif damage == "no-manifest":  # a build killed before its last step
        (path / MANIFEST).unlink()
    version = "v2" if damage == "old-version" else "v1"
    built_dir(tmp_path / "model", _build(calls), "the test model", version)
    assert len(calls) == 2 and (path / "weights.bin").stat().st_size == 1000
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the test model" in err[0] and "building it again" in err[0]


def test_a_killed_build_leaves_nothing_in_place(tmp_path):
    def dies(tmp):
        (tmp / "weights.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        built_dir(tmp_path / "model", dies, "the test model", "v1")
    assert list(tmp_path.iterdir()) == []  # neither the result nor the half-built directory
    assert built_dir(tmp_path / "model", _build([]), "the test model", "v1").is_dir()


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_build_directories_of_dead_processes_are_removed_once_an_hour_old(tmp_path):
    """A process killed by a signal (torchrun's SIGTERM) leaves model.tmp<pid>; the next build sweeps it."""
    old = time.time() - cache.ABANDONED_AFTER_S - 60
    pids = (_dead_pid(), _dead_pid(), os.getppid())
    dead_old, dead_new, live_old = (tmp_path / f"model.tmp{pid}" for pid in pids)
    for tmp in (dead_old, dead_new, live_old):
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "weights.bin").write_bytes(b"x")
    for tmp in (dead_old, live_old):
        os.utime(tmp, (old, old))
    built_dir(tmp_path / "model", _build([]), "the test model", "v1")
    assert not dead_old.exists()
    assert dead_new.exists()  # maybe another machine's live build, in a cache shared between machines
    assert live_old.exists()


def test_a_damaged_converted_model_is_converted_again(tmp_path, monkeypatch, capsys):
    """load_causal_lm: a file damaged in a way sizes do not show fails to load, is rebuilt once, loads."""
    pytest.importorskip("transformers")
    from quickmerge.pretrained import causal_lm
    from tests.eval.conftest import save_tiny_lm

    monkeypatch.setenv("QUICKMERGE_CACHE", str(tmp_path))
    monkeypatch.setitem(causal_lm.PACKAGED, "tiny", causal_lm.PackagedModel("none", "", "", False))
    monkeypatch.setattr(causal_lm, "_convert", lambda name, spec, out, m, t: save_tiny_lm(out))
    model, _ = causal_lm.load_causal_lm("tiny")
    weights = tmp_path / "models" / "tiny" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(b"\0" * size)  # same size, garbage inside
    capsys.readouterr()
    again, _ = causal_lm.load_causal_lm("tiny")
    assert "cannot be loaded; building it again" in capsys.readouterr().err
    assert type(again) is type(model)
