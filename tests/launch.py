"""Helpers for tests that start ``torchrun`` or the command line."""

import os
from pathlib import Path

LAUNCHER = "torch/distributed/elastic/"
ROOT = Path(__file__).resolve().parents[1]
# set while a ``transformers_free`` test runs (tests/conftest.py): the file its children log watched imports to
IMPORT_LOG = "QUICKMERGE_TESTS_IMPORT_LOG"
# the packages such a test must not import: transformers, tokenizers, and typer (the command-line library of
# huggingface_hub's and transformers' own CLIs: watched so that tests/newest_scope.py may count it in their family)
WATCHED = ("transformers", "tokenizers", "typer")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child, the repository first on ``PYTHONPATH`` and after it whatever
    ``PYTHONPATH`` the run has: a release overlaid on the environment (``.ci/release_matrix.py``, the newest torch's
    check) reaches the child too, which would otherwise import the environment's own release. ``extra`` is added."""
    paths = [str(ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
    if os.environ.get(IMPORT_LOG):  # a transformers_free test's child logs what it must not import
        paths.insert(0, str(ROOT / "tests" / "transformers_free_site"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), **extra}


def rank_errors(stderr: str, limit: int = 3000) -> str:
    """What the ranks printed to stderr before the launcher's first own line (its SIGTERM notice and traceback
    would fill a truncated assertion message and hide the cause)."""
    lines = stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if LAUNCHER in line), len(lines))
    return "\n".join(lines[:first])[-limit:]


def run_here(command: list[str]) -> int:
    """``[python, -m, quickmerge, ...]`` run in this process (``quickmerge.cli.main``): the same code without a second
    interpreter's start-up (about 6 s of imports with transformers); the exit status. For the runs whose point is not
    a process of their own (a killed run and torchrun's stay subprocesses)."""
    from quickmerge.cli import main

    if command[1:3] != ["-m", "quickmerge"]:
        raise ValueError(f"not a python -m quickmerge command: {command[:3]}")
    return main(command[3:])
