"""The ``quickmerge`` console command."""

from __future__ import annotations

import argparse
import json
import sys


def _keep_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--keep must lie in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quickmerge", description="QuickMerge++ token merging for transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="merge a real encoder's tokens of real text and report what merged")
    demo.add_argument("--text", default=None, help="text to compress (default: a Wikipedia article's opening)")
    demo.add_argument("--keep", type=_keep_ratio, default=0.25, help="share of tokens to keep, in (0, 1]")
    demo.add_argument("--json", default=None, help="also write the reported figures to this JSON file")
    evaluate = sub.add_parser("eval", help="run an evaluation protocol")
    protocols = evaluate.add_subparsers(dest="protocol", required=True)
    from .eval.text_cli import add_arguments as add_text_arguments

    add_text_arguments(protocols.add_parser("text", help="continuation perplexity of a real LM on a compressed context"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run

        figures = run(args.text, args.keep)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(figures, handle, indent=2)
    elif args.command == "eval" and args.protocol == "text":
        from .eval.text_cli import run as run_text

        run_text(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
