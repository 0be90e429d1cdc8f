"""Finished rows of an evaluation, on disk as soon as each is done, so an interrupted run resumes.

``<out>.journal/`` holds ``config.json`` (the settings every row depends on) and one
``rank<r>.jsonl`` per process, a line per finished row ``{"key": ..., "row": ...}``, flushed
and synced when written. Running the same command again reads every rank's lines and
skips their rows; a last line cut short by a kill is ignored. A journal written under other
settings is refused (``--fresh`` deletes it and starts over).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .._cache import write_text_atomic


def code_fingerprint() -> str:
    """SHA-256 of quickmerge's own source: rows computed by other code are not mixed in."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class ConfigMismatchError(ValueError):
    """The journal on disk was written under other settings."""


class Journal:
    """Rows of one evaluation, keyed by strings (``example|method|ratio``, ``method|r|settings``)."""

    def __init__(self, out: str | Path, config: dict[str, Any], *, rank: int = 0, fresh: bool = False) -> None:
        self.dir = Path(str(out) + ".journal")
        self.rank = rank
        self.config = json.loads(json.dumps(config))  # as it reads back from disk
        if fresh and rank == 0 and self.dir.exists():
            shutil.rmtree(self.dir)

    def open(self) -> dict[str, Any]:
        """Check (rank 0: write) the settings and return every finished row ``{key: row}``."""
        config_file = self.dir / "config.json"
        if config_file.exists():
            stored = json.loads(config_file.read_text())
            if stored != self.config:
                changed = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
                raise ConfigMismatchError(
                    f"{self.dir} holds rows computed with other settings ({', '.join(changed)}: "
                    f"{[stored.get(k) for k in changed]} there, {[self.config.get(k) for k in changed]} now); "
                    "rerun with --fresh to start over, or choose another --out"
                )
        elif self.rank == 0:
            write_text_atomic(config_file, json.dumps(self.config, indent=2, sort_keys=True))
        mine = self.dir / f"rank{self.rank}.jsonl"
        if mine.exists() and mine.stat().st_size and not mine.read_bytes().endswith(b"\n"):
            with open(mine, "a") as f:  # a kill cut the last line short: start the next one on a line of its own
                f.write("\n")
        return self.rows()

    def rows(self) -> dict[str, Any]:
        """Every rank's finished rows."""
        done: dict[str, Any] = {}
        for path in sorted(self.dir.glob("rank*.jsonl")) if self.dir.exists() else []:
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line a kill cut short; its row is computed again
                done[entry["key"]] = entry["row"]
        return done

    def add(self, key: str, row: Any) -> None:
        """Append one finished row to this rank's file, flushed to disk."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / f"rank{self.rank}.jsonl", "a") as f:
            f.write(json.dumps({"key": key, "row": row}) + "\n")
            f.flush()
            os.fsync(f.fileno())
