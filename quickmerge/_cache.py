"""Where quickmerge keeps what it derives once (converted models, parsed text), and how it writes it."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """``$QUICKMERGE_CACHE``, or ``~/.cache/quickmerge``."""
    root = os.environ.get("QUICKMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quickmerge")
    return Path(root)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it: readers see all of it or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


MANIFEST = "quickmerge-manifest.json"


def built_dir(path: Path, build: Callable[[Path], None], what: str, version: str) -> Path:
    """``path``, built by ``build(tmp)`` into a temporary directory and renamed into place once.

    A manifest of the files' sizes is written last; a directory without it, with other sizes
    (a build killed half-way, a truncated file) or of another ``version`` is built again after
    a one-line message.
    """
    if _intact(path, version):
        return path
    if path.exists():
        discard(path, what, "is incomplete, damaged or from another quickmerge release")
    _remove_abandoned_builds(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"version": version, "files": files}, indent=1))
    try:
        os.replace(tmp, path)
    except OSError:
        if not _intact(path, version):  # not another process that finished the same build first
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return path


ABANDONED_AFTER_S = 3600.0


def _remove_abandoned_builds(path: Path) -> None:
    """Remove ``path.tmp<pid>`` build directories of processes that died (killed by a signal).

    Only those whose process is gone from this machine *and* untouched for an hour: a cache shared
    between machines may hold a live build of another machine's process with the same number.
    """
    now = time.time()
    for tmp in path.parent.glob(f"{path.name}.tmp*"):
        pid = tmp.name[len(path.name) + 4 :]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if now - tmp.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def discard(path: Path, what: str, reason: str) -> None:
    """Say in one line that ``what`` at ``path`` is unusable and will be rebuilt, and remove it."""
    print(f"quickmerge: {what} in {path} {reason}; building it again", file=sys.stderr)
    shutil.rmtree(path, ignore_errors=True)


def _intact(path: Path, version: str) -> bool:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != version:
        return False
    files = manifest.get("files", {})
    return bool(files) and all((path / name).is_file() and (path / name).stat().st_size == size
                               for name, size in files.items())
