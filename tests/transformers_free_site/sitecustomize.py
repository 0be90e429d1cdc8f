"""Test-only: a child of a ``transformers_free`` test appends to ``QUICKMERGE_TESTS_IMPORT_LOG`` each
package of ``tests.launch.WATCHED`` it imports (:func:`tests.launch.child_env` puts this directory first on
``PYTHONPATH`` while such a test runs). The import itself goes ahead: the parent test fails on the log."""

import os
import sys

from tests.launch import IMPORT_LOG, WATCHED


class _ImportLog:
    def find_spec(self, name, path=None, target=None):
        if name in WATCHED:
            with open(os.environ[IMPORT_LOG], "a") as log:
                log.write(f"{name} (pid {os.getpid()}: {' '.join(sys.argv)[:200]})\n")
        return None  # the regular finders import it


if os.environ.get(IMPORT_LOG):
    sys.meta_path.insert(0, _ImportLog())
