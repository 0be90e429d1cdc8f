"""``quickmerge eval text``: the text protocol end to end, JSON and PNG out."""

from __future__ import annotations

import argparse
import platform
import warnings
from typing import Any

import torch

from .. import distributed
from ..env_report import installed_versions
from ..errors import UsageError
from .cli_common import add_press_run_arguments, check_press_run_arguments
from .journal import Journal, code_fingerprint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m, or an HF id/path")
    parser.add_argument("--examples", type=int, default=40, help="number of Wikipedia windows")
    parser.add_argument("--first", type=int, default=0,
                        help="number of the first window (windows FIRST .. FIRST + EXAMPLES - 1): evaluate on "
                        "windows that development did not use")
    parser.add_argument("--task", choices=["wikipedia", "repeated", "repeated-later"], default="wikipedia",
                        help="wikipedia: an article's next tokens; repeated: a passage that already appeared "
                        "at a random depth of the context (copying needed), one window per article opening; "
                        "repeated-later: the same task on the articles' later text (other windows: 515 with "
                        "SmolLM2 at C = 1024)")
    parser.add_argument("--context", type=int, default=1024, help="context tokens C")
    parser.add_argument("--continuation", type=int, default=64, help="scored continuation tokens T")
    add_press_run_arguments(parser, ratios=[0.25, 0.5, 0.75], out="results/text")


def run(args: argparse.Namespace) -> dict:
    from ..pretrained.causal_lm import load_causal_lm, needs_bos
    from .report import write_report
    from .text import plot_text_eval, run_text_eval, wikipedia_windows
    from .text_methods import build_method, default_methods

    check_press_run_arguments(args, args.examples, "--examples")
    if args.context < 1 or args.continuation < 1:
        raise UsageError("--context and --continuation must be positive")
    if args.first < 0:
        raise UsageError(f"--first must be 0 or more, got {args.first}")
    if args.task == "repeated":
        from .retrieval import repeated_window_count

        distinct = repeated_window_count()
        if args.first + args.examples > distinct:
            raise UsageError(f"--first + --examples: the repeated task has windows 0..{distinct - 1}, asked for "
                             f"{args.first}..{args.first + args.examples - 1}")
    methods = [build_method(n) for n in (args.methods or default_methods())]  # fails fast on a missing extra
    torch.set_num_threads(args.threads)
    ctx = distributed.setup()
    try:
        journal = Journal(args.out, journal_config(args), rank=ctx.rank, fresh=args.fresh)
        model, tokenizer = load_causal_lm(args.model)
        methods = methods_the_model_can_run(model, methods, args.ratios[0], chosen=args.methods is not None)
        model.to(ctx.device)
        bos = needs_bos(args.model)
        if args.task == "repeated":
            from .retrieval import repeated_passage_windows

            examples = repeated_passage_windows(tokenizer, args.examples, args.context, args.continuation,
                                                bos=bos, first=args.first)
        elif args.task == "repeated-later":
            from .retrieval import repeated_passage_windows, repeated_window_count

            distinct = repeated_window_count("later", tokenizer, args.context, bos=bos)
            if args.first + args.examples > distinct:  # counted in tokens, so only once the tokenizer is here
                last = args.first + args.examples - 1
                raise UsageError(f"--first + --examples: the repeated-later task has windows 0..{distinct - 1} "
                                 f"at --context {args.context}, asked for {args.first}..{last}")
            examples = repeated_passage_windows(tokenizer, args.examples, args.context, args.continuation,
                                                bos=bos, first=args.first, source="later")
        else:
            try:
                windows = wikipedia_windows(tokenizer, args.first + args.examples, args.context, args.continuation,
                                            bos=bos)
            except ValueError as err:  # fewer windows than --first + --examples ask for
                raise UsageError(str(err)) from None
            examples = windows[args.first :]
        indices = list(range(args.first, args.first + len(examples)))
        results = run_text_eval(model, examples, methods, args.ratios, args.context, journal=journal, ctx=ctx,
                                indices=indices)
    finally:
        ctx.close()
    if results is None:
        return {}  # not rank 0: rank 0 writes the results
    results["config"] = {**vars(args), "processes": ctx.world, "torch": torch.__version__,
                         "platform": platform.platform(),
                         "versions": installed_versions()}
    shown = f"{args.examples}" if args.first == 0 else f"{args.examples} (from number {args.first})"
    task = {"repeated": "windows, continuation repeated from the context",
            "repeated-later": "later-text windows, continuation repeated from the context"}.get(
                args.task, "Wikipedia windows")
    title = f"{args.model}: {shown} {task}"
    paths = write_report(results, args.out, lambda png: plot_text_eval(results, png, title))
    print(format_table(results))
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return results


def methods_the_model_can_run(model: Any, methods: list, ratio: float, chosen: bool) -> list:
    """Before any example: a method whose press refuses the model (proportional attention and the per-head layouts
    need additive float masks, which flex and flash attention do not take; the input press merges after a layer
    the model must have) would stop the run when its turn came. Chosen with ``--methods``, it is refused; among the
    defaults, it is left out with a warning that says why."""
    from .text_methods import methods_refused

    refused = methods_refused(methods, ratio, model)
    if not refused:
        return methods
    reasons = "; ".join(dict.fromkeys(refused.values()))  # each reason once
    if chosen:
        raise UsageError(f"--methods: {', '.join(refused)} cannot run on {type(model).__name__}: {reasons}; or "
                         "leave them out with --methods")
    warnings.warn(f"{', '.join(refused)} left out of the default methods: {reasons}", stacklevel=2)
    return [m for m in methods if m.name not in refused]


def journal_config(args: argparse.Namespace) -> dict:
    """What every row depends on: rows computed under other settings are never mixed in."""
    import transformers

    return {"protocol": "text", "task": args.task, "model": args.model, "context": args.context,
            "continuation": args.continuation,
            "torch": torch.__version__, "transformers": transformers.__version__, "code": code_fingerprint()}


def format_table(results: dict) -> str:
    """Markdown table: perplexity and ratio to uncompressed with 95% intervals, per ratio and method."""
    lines = [
        "| ratio | method | perplexity [95% CI] | vs uncompressed [95% CI] | achieved | prefill s | decode s |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = sorted(results["summary"], key=lambda r: (r["compression_ratio"] or 0, r["ratio_to_uncompressed"]))
    for r in rows:
        lo, hi = r["perplexity_ci95"]
        rlo, rhi = r["ratio_to_uncompressed_ci95"]
        ratio = "0" if r["compression_ratio"] is None else f"{r['compression_ratio']:g}"
        lines.append(
            f"| {ratio} | {r['method']} | {r['perplexity']:.3f} [{lo:.2f}, {hi:.2f}] | "
            f"{r['ratio_to_uncompressed']:.4f} [{rlo:.4f}, {rhi:.4f}] | {r['achieved_ratio']:.3f} | "
            f"{r['prefill_s_median']:.3f} | {r['decode_s_median']:.3f} |"
        )
    return "\n".join(lines)
