"""``quickmerge env``: a line per package of every extra, what is missing named with its extra."""

import re
from importlib import metadata

import pytest

import quickmerge
from quickmerge.cli import main
from quickmerge.env_report import EXTRAS, report


def rows(lines):
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in lines)


def test_every_package_of_every_extra_has_its_installed_version():
    found = rows(report())
    assert found["quickmerge"] == quickmerge.__version__
    for _, distributions in EXTRAS:
        for name in distributions:
            try:
                assert found[name] == metadata.version(name)
            except metadata.PackageNotFoundError:
                assert found[name].startswith("not installed")
    assert found["accelerator"]


def test_a_missing_package_names_the_extra_that_brings_it(monkeypatch):
    real = metadata.version

    def without_timm(name):
        if name == "timm":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", without_timm)
    assert rows(report())["timm"] == "not installed (pip install 'quickmerge[vision]')"


def test_the_kvpress_line_says_whether_its_presses_run_beside_this_transformers(capsys):
    pytest.importorskip("kvpress")
    pytest.importorskip("transformers")
    from quickmerge.eval.text_methods import kvpress_incompatibility

    assert main(["env"]) == 0
    line = rows(capsys.readouterr().out.splitlines())["kvpress presses"]
    why = kvpress_incompatibility()
    assert line == ("run here" if why is None else f"refused: {why}")


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"quickmerge {quickmerge.__version__}"


def test_without_kvpress_there_is_nothing_to_refuse(monkeypatch):
    from quickmerge._optional import kvpress_incompatibility

    real_version, real_requires = metadata.version, metadata.requires

    def missing(real):
        def lookup(name):
            if name == "kvpress":
                raise metadata.PackageNotFoundError(name)
            return real(name)
        return lookup

    monkeypatch.setattr(metadata, "version", missing(real_version))
    monkeypatch.setattr(metadata, "requires", missing(real_requires))
    kvpress_incompatibility.cache_clear()
    try:
        assert kvpress_incompatibility() is None
        found = rows(report())
        assert found["kvpress"] == "not installed (pip install 'quickmerge[kvpress]')"
        assert "kvpress presses" not in found
    finally:
        kvpress_incompatibility.cache_clear()
