"""``quickmerge eval passkey``: can the model still answer a passkey inserted once in a compressed context?"""

from __future__ import annotations

import argparse
import platform

import torch

from .. import distributed
from ..env_report import installed_versions
from ..errors import UsageError
from .cli_common import add_press_run_arguments, check_press_run_arguments
from .journal import Journal, code_fingerprint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m, or an HF id/path")
    parser.add_argument("--trials", type=int, default=100, help="passkey trials (each: its own key, depth, length)")
    parser.add_argument("--first", type=int, default=0,
                        help="number of the first trial (trials FIRST .. FIRST + TRIALS - 1 of the seed): more "
                             "trials for a setting without running the earlier ones again")
    parser.add_argument("--min-context", type=int, default=1024, help="shortest context in tokens")
    parser.add_argument("--max-context", type=int, default=4096, help="longest context in tokens")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the trials (keys, depths, lengths): tune on one seed, report another")
    parser.add_argument("--needle", choices=("landmark", "once"), default="landmark",
                        help="landmark: the key in two sentences (Landmark attention's passkey test); once: stated "
                             "a single time")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy answer length in tokens")
    parser.add_argument("--answered-only", action="store_true",
                        help="run the compressed settings only on the trials the uncompressed model answers (their "
                             "accuracy is then the share of its answers they keep); the uncompressed accuracy over "
                             "every trial is reported too")
    add_press_run_arguments(parser, ratios=[0.5, 0.75], out="results/passkey")


def run(args: argparse.Namespace) -> dict:
    from ..pretrained.causal_lm import load_causal_lm, needs_bos
    from .report import write_report
    from .retrieval import answer_passkey, passkey_trials, summarise_passkey
    from .text import run_text_eval
    from .text_methods import build_method, default_methods

    check_press_run_arguments(args, args.trials, "--trials")
    if args.first < 0:
        raise UsageError(f"--first must be 0 or more, got {args.first}")
    if not 64 <= args.min_context <= args.max_context:
        raise UsageError(f"need 64 <= --min-context <= --max-context, got {args.min_context}, {args.max_context}")
    if args.new_tokens < 5:
        raise UsageError(f"--new-tokens must be at least 5 (a key has five digits), got {args.new_tokens}")
    methods = [build_method(n) for n in (args.methods or default_methods())]
    torch.set_num_threads(args.threads)
    ctx = distributed.setup()
    try:
        journal = Journal(args.out, journal_config(args), rank=ctx.rank, fresh=args.fresh)
        model, tokenizer = load_causal_lm(args.model)
        model.to(ctx.device)
        trials = passkey_trials(tokenizer, args.trials, min_context=args.min_context, max_context=args.max_context,
                                bos=needs_bos(args.model), seed=args.seed, needle=args.needle, first=args.first)
        numbers = list(range(args.first, args.first + len(trials)))

        def scorer(trial, press, method, ratio):
            return answer_passkey(model, tokenizer, trial, press, method, new_tokens=args.new_tokens)

        everything = None
        if args.answered_only:  # first the uncompressed model on every trial, then the rest on what it answers
            everything = run_text_eval(model, trials, [], [], 0, journal=journal, ctx=ctx, scorer=scorer,
                                       summary=summarise_passkey, indices=numbers)
            flags = None if everything is None else _uncompressed(everything)["correct_per_trial"]
            answered = ctx.broadcast(None if flags is None else [i for i, c in enumerate(flags) if c])
            if not answered:
                raise UsageError("the uncompressed model answers none of the trials: nothing to compress")
            trials, numbers = [trials[i] for i in answered], [numbers[i] for i in answered]
        results = run_text_eval(model, trials, methods, args.ratios, 0, journal=journal, ctx=ctx, scorer=scorer,
                                summary=summarise_passkey, indices=numbers)
    finally:
        ctx.close()
    if results is None:
        return {}
    base = None if everything is None else _uncompressed(everything)
    if base is not None:
        results["answered_only"] = {
            "trials_answered": numbers, "uncompressed_accuracy_all_trials": base["accuracy"],
            "uncompressed_accuracy_all_trials_ci95": base["accuracy_ci95"], "all_trials": everything["trials"],
            "meaning": "compressed settings ran only on the trials the uncompressed model answers; their accuracy "
                       "is the share of those answers they keep"}
    results["config"] = {**vars(args), "processes": ctx.world, "torch": torch.__version__,
                         "platform": platform.platform(),
                         "versions": installed_versions()}
    shown = f"{args.trials} trials" + (f" (from number {args.first})" if args.first else "")
    title = f"{args.model}: passkey in {args.min_context}-{args.max_context} tokens, {shown}"
    if args.needle != "landmark":
        title += f", key stated {args.needle}"
    if base is not None:
        title += f"; uncompressed answers {len(numbers)} ({base['accuracy']:.0%}), compressed run on those"
    paths = write_report(results, args.out, lambda png: plot_passkey(results, png, title))
    print(format_table(results))
    if base is not None:
        lo, hi = base["accuracy_ci95"]
        print(f"uncompressed, every trial: {base['accuracy']:.2f} [{lo:.2f}, {hi:.2f}]; "
              f"the table's trials are the {len(numbers)} it answers")
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return results


def _uncompressed(results: dict) -> dict:
    return next(r for r in results["summary"] if r["compression_ratio"] is None)


def journal_config(args: argparse.Namespace) -> dict:
    import transformers

    return {"protocol": "passkey", "model": args.model, "trials": args.trials, "min_context": args.min_context,
            "max_context": args.max_context, "seed": args.seed, "new_tokens": args.new_tokens,
            **({"first": args.first} if args.first else {}),
            **({"needle": args.needle} if args.needle != "landmark" else {}),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "code": code_fingerprint()}


def format_table(results: dict) -> str:
    lines = ["| ratio | method | accuracy [95% CI] | minus uncompressed [95% CI] |", "|---|---|---|---|"]
    rows = sorted(results["summary"], key=lambda r: (r["compression_ratio"] or 0, -r["accuracy"]))
    for r in rows:
        lo, hi = r["accuracy_ci95"]
        dlo, dhi = r["minus_uncompressed_ci95"]
        ratio = "0" if r["compression_ratio"] is None else f"{r['compression_ratio']:g}"
        lines.append(f"| {ratio} | {r['method']} | {r['accuracy']:.2f} [{lo:.2f}, {hi:.2f}] | "
                     f"{r['minus_uncompressed']:+.2f} [{dlo:+.2f}, {dhi:+.2f}] |")
    return "\n".join(lines)


def plot_passkey(results: dict, path: str, title: str) -> None:
    """Accuracy per method at each ratio (bars with 95% intervals), the uncompressed model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    base = next(r for r in rows if r["compression_ratio"] is None)
    ratios = sorted({r["compression_ratio"] for r in rows if r["compression_ratio"] is not None})
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 5), squeeze=False)
    for ax, ratio in zip(axes[0], ratios, strict=True):
        mine = sorted((r for r in rows if r["compression_ratio"] == ratio), key=lambda r: -r["accuracy"])
        y = [r["accuracy"] for r in mine]
        err = [[v - r["accuracy_ci95"][0] for v, r in zip(y, mine, strict=True)],
               [r["accuracy_ci95"][1] - v for v, r in zip(y, mine, strict=True)]]
        colours = ["black" if r["method"].startswith("quickmerge") else "tab:blue" for r in mine]
        ax.barh(range(len(mine)), y, xerr=err, color=colours, capsize=2)
        ax.set_yticks(range(len(mine)), [r["method"] for r in mine], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(base["accuracy"], color="red", linestyle="--", label="uncompressed")
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("exact-match accuracy")
        ax.set_title(f"ratio {ratio:g}", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
