"""Arguments and checks shared by the KV-cache protocols (`eval text`, `passkey`, `image`, `video`)."""

from __future__ import annotations

import argparse

from ..cli_types import positive_int
from ..errors import UsageError


def add_press_run_arguments(parser: argparse.ArgumentParser, *, ratios: list[float], out: str,
                            extra_methods: list[str] | None = None) -> None:
    """``--ratios``, ``--methods``, ``--threads``, ``--out`` and ``--fresh`` with this protocol's defaults."""
    from .text_methods import KVPRESS, OURS

    parser.add_argument("--ratios", type=float, nargs="+", default=ratios, help="compression ratios")
    names = OURS + (extra_methods or []) + KVPRESS
    parser.add_argument("--methods", nargs="+", default=None, choices=names, metavar="METHOD",
                        help=f"default: all that are installed; one or more of {', '.join(names)}")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (per process)")
    parser.add_argument("--out", default=out, help="output prefix (.json and .png are added)")
    parser.add_argument("--fresh", action="store_true", help="discard the rows of an interrupted run and start over")


def check_press_run_arguments(args: argparse.Namespace, count: int | None, what: str) -> None:
    """Refuse too few examples (``what``: the flag that sets ``count``; None: known only once the data is read)
    and ratios outside (0, 1)."""
    if count is not None and count < 2:
        raise UsageError(f"{what} must be at least 2 (bootstrap intervals need several examples)")
    if not all(0.0 < r < 1.0 for r in args.ratios):
        raise UsageError(f"--ratios must lie in (0, 1), got {args.ratios}")
