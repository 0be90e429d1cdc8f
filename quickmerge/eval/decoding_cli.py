"""``quickmerge eval decoding``: merging while decoding against kvpress's ``DecodingPress``, JSON and PNG out."""

from __future__ import annotations

import argparse
import platform
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import distributed
from ..cli_types import non_negative_float, non_negative_int, positive_int
from ..env_report import installed_versions
from ..errors import UsageError
from .journal import Journal, code_fingerprint

if TYPE_CHECKING:
    from .decoding import DecodingProtocol


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m, gemma3-270m or an HF id/path (Wikipedia windows); image or video (the "
                             "shipped AR models, on test images / held-out clip windows) or a directory of one")
    parser.add_argument("--examples", type=positive_int, default=None,
                        help="number of windows (default 32 Wikipedia windows; 40 images or clip windows; with "
                             "--video, every window of the clip, at most 40)")
    parser.add_argument("--video", default=None,
                        help="with a video model: any clip OpenCV reads, or a .gz of one (default: held-out frames "
                             "of the training clips and held-out Moving Fashion-MNIST)")
    parser.add_argument("--first", type=non_negative_int, default=0,
                        help="number of the first window (windows FIRST .. FIRST + EXAMPLES - 1)")
    parser.add_argument("--prompt", type=positive_int, default=None,
                        help="prompt tokens P, prefilled whole (default 128; video: BOS + the first frame, 257; "
                             "image: BOS + 4 rows, 113)")
    parser.add_argument("--continuation", type=positive_int, default=None,
                        help="tokens decoded one per call after the prompt, teacher forcing (with --generate: one "
                             "more is generated, the last call's pick) (default 640; video / image: the rest of the "
                             "sequence, 767 / 671)")
    parser.add_argument("--sizes", type=positive_int, nargs="+", default=None,
                        help="cache budgets S: every full-attention layer back to S entries per KV head (default "
                             "192; video: BOS + 1.5 frames, 385; image: BOS + 7 rows, 197)")
    parser.add_argument("--interval", type=positive_int, default=None,
                        help="decoded tokens I between two compressions: the cache stays within S and S + I "
                             "(default 64; video: a quarter frame, 64; image: one row, 28)")
    parser.add_argument("--batch", type=positive_int, default=16, help="windows decoded together (default 16)")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="quickmerge, quickmerge-w<window> (QuickMergePress with that decoding window), "
                             "kvpress-<scorer> (knorm, streaming-llm, snapkv, expected-attention, "
                             "expected-attention-eps, tova, keydiff, random) or kvpress-snapkv-w<window>; default: "
                             "quickmerge and, when kvpress runs here, every scorer plus SnapKV at window I - 1")
    parser.add_argument("--generate", action="store_true",
                        help="free-running generation instead of teacher forcing: each method picks its own tokens "
                             "after the prompt; scored: the tokens identical to uncompressed generation after the "
                             "first compression")
    parser.add_argument("--temperature", type=non_negative_float, default=None,
                        help="with --generate: 0 (default) greedy; above 0, sampling coupled across methods (the "
                             "same Gumbel noise per window and token, so uncompressed generation is the reference)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (per process)")
    parser.add_argument("--out", default="results/decoding", help="output prefix (.json and .png are added)")
    parser.add_argument("--fresh", action="store_true", help="discard the rows of an interrupted run and start over")


def check_arguments(args: argparse.Namespace) -> list:
    """Fill in the model's defaults and refuse what cannot run, before any model is loaded; the budgets, one per
    size."""
    from ..pretrained.ar_models import ar_format
    from .decoding import TEXT_DEFAULTS, DecodingBudget, ar_defaults, method_refusal

    if args.temperature is not None and not args.generate:
        raise UsageError("--temperature: only with --generate (teacher forcing picks no tokens)")
    if args.generate and args.temperature is None:
        args.temperature = 0.0
    fmt = ar_format(args.model)
    if args.video is not None and (fmt is None or not fmt.context_frames):
        raise UsageError(f"--video: needs a video model (--model video or a directory of one), got {args.model}")
    if args.video is not None and not Path(args.video).is_file():
        raise UsageError(f"--video: no file at {args.video}")
    defaults = TEXT_DEFAULTS if fmt is None else ar_defaults(fmt)
    for name in ("examples", "prompt", "continuation", "sizes", "interval"):
        if name == "examples" and args.video is not None:
            continue  # every window of the clip (at most the default), counted once it is read
        if getattr(args, name) is None:
            setattr(args, name, list(defaults.sizes) if name == "sizes" else getattr(defaults, name))
    if fmt is not None and args.prompt + args.continuation + 1 > fmt.length:
        raise UsageError(f"--prompt + --continuation ({args.prompt} + {args.continuation}) must be at most "
                         f"{fmt.length - 1}: the {fmt.name} model's sequences hold {fmt.length} tokens (BOS "
                         "included) and the last call's prediction is scored too")
    if args.examples is not None and args.examples < 2:
        raise UsageError("--examples must be at least 2 (bootstrap intervals need several examples)")
    budgets = [DecodingBudget(args.prompt, size, args.interval) for size in dict.fromkeys(args.sizes)]
    for budget in budgets:
        if budget.refusal() is not None:
            raise UsageError(f"--prompt, --sizes, --interval: {budget.refusal()}")
        if budget.first_scored > args.continuation:
            raise UsageError(f"--continuation ({args.continuation}) must be at least size + interval - prompt + 1 "
                             f"({budget.first_scored}, size {budget.size}): the tokens scored are those predicted "
                             "after the first compression")
    for method in args.methods or []:
        if method_refusal(method, args.interval, args.sizes) is not None:
            raise UsageError(f"--methods: {method_refusal(method, args.interval, args.sizes)}")
    return budgets


def chosen_methods(args: argparse.Namespace) -> list[str]:
    """``--methods`` or the defaults; kvpress's refused here, with the reason, when kvpress cannot run."""
    from .decoding import default_methods
    from .text_methods import kvpress_for_defaults, require_kvpress

    if args.methods is None:
        return default_methods(args.interval, kvpress_for_defaults())
    methods = list(dict.fromkeys(m for m in args.methods if m != "none"))
    if not methods:
        raise UsageError("--methods: name at least one method besides none (no compression always runs)")
    theirs = [m for m in methods if m.startswith("kvpress-")]
    if theirs:
        require_kvpress(f"methods {', '.join(theirs)}")
    return methods


def run(args: argparse.Namespace) -> dict:
    from ..pretrained.ar_models import ar_format
    from .decoding import is_ours, make_press, run_decoding_eval
    from .report import write_report

    budgets = check_arguments(args)
    methods = chosen_methods(args)
    protocol = _protocol(args)
    fmt = ar_format(args.model)
    torch.set_num_threads(args.threads)
    ctx = distributed.setup()
    try:
        journal = Journal(args.out, journal_config(args, protocol), rank=ctx.rank, fresh=args.fresh)
        model, windows, source = _model_and_windows(args, fmt)
        model.set_attn_implementation("sdpa")  # QuickMergePress weighs entries by their sizes inside SDPA or eager
        ours = [m for m in methods if is_ours(m)]
        why = make_press(ours[0], budgets[0].size, args.interval).refusal(model) if ours else None
        if why is not None and args.methods is not None:
            raise UsageError(f"--methods: {', '.join(ours)} cannot run on {type(model).__name__}: {why}")
        if why is not None:
            warnings.warn(f"quickmerge left out of the default methods: {why}", stacklevel=2)
            methods = [m for m in methods if not is_ours(m)]
        if not methods:
            raise UsageError(f"no method can run on {type(model).__name__} here: quickmerge refuses it and "
                             "kvpress's presses do not run (see the warnings above)")
        model.to(ctx.device)
        indices = list(range(args.first, args.first + args.examples))
        results = run_decoding_eval(model, windows[args.first :], methods, budgets, batch=args.batch,
                                    journal=journal, ctx=ctx, indices=indices, protocol=protocol)
    finally:
        ctx.close()
    if results is None:
        return {}
    results["config"] = {**vars(args), "processes": ctx.world, "torch": torch.__version__,
                         "platform": platform.platform(), "versions": installed_versions()}
    if fmt is not None:  # as eval image / eval video report them
        if protocol.scores_nll:
            from .generative import add_bits_per_token

            add_bits_per_token(results["summary"])
        results["format"] = fmt.to_dict()
    shown = f"{args.examples}" if args.first == 0 else f"{args.examples} (from number {args.first})"
    title = (f"{args.model}: {shown} {source}, {args.prompt}-token prompt kept whole, "
             f"{protocol.describe(args.continuation)}; full-attention layers merged (QuickMerge++) or evicted "
             "(kvpress)")
    paths = write_report(results, args.out, lambda png: protocol.plot(results, png, title))
    print(protocol.table(results))
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return results


def _protocol(args: argparse.Namespace) -> DecodingProtocol:
    """Teacher forcing, or free-running generation at ``--temperature`` with ``--generate``."""
    from .decoding import TeacherForcing

    if not args.generate:
        return TeacherForcing()
    from .generation import Generation

    return Generation(args.temperature)


def _model_and_windows(args: argparse.Namespace, fmt: Any) -> tuple[Any, list, str]:
    """The model, the first ``FIRST + EXAMPLES`` windows (prompt + continuation + 1 tokens each) and their description:
    Wikipedia windows for a causal LM, test images or held-out clip windows for an AR model (``fmt``)."""
    if fmt is None:
        from ..pretrained.causal_lm import load_causal_lm, needs_bos
        from .text import wikipedia_windows

        model, tokenizer = load_causal_lm(args.model)
        try:
            windows = wikipedia_windows(tokenizer, args.first + args.examples, context=args.prompt,
                                        continuation=args.continuation, bos=needs_bos(args.model))
        except ValueError as err:  # fewer windows than asked for
            raise UsageError(str(err)) from None
        return model, windows, "Wikipedia windows"
    from ..pretrained.ar_models import load_ar
    from .decoding import ar_defaults
    from .generative import image_examples, video_examples
    from .text import TextExample

    model, tokenizer, fmt = load_ar(args.model)
    count = None if args.examples is None else args.first + args.examples
    try:  # fewer images or clip windows than asked for
        if args.video is not None:
            examples = video_examples(fmt, tokenizer, count, args.video, at_most=args.first + ar_defaults(fmt).examples)
            source = f"windows of {Path(args.video).name}"
        elif fmt.context_frames:
            examples, source = video_examples(fmt, tokenizer, count), "held-out clip windows"
        else:
            examples, source = image_examples(fmt, tokenizer, count), "test images"
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.examples is None:  # --video alone: every window of the clip, from --first on
        args.examples = len(examples) - args.first
        if args.examples < 2:
            raise UsageError(f"--video: {args.video} holds {len(examples)} window(s) of {fmt.frames} frames"
                             f"{f' (from --first {args.first})' if args.first else ''}; the bootstrap intervals "
                             "need at least 2")
    # the first prompt + continuation + 1 tokens of each sequence, as the flags ask (the whole of it by default)
    end = args.prompt + args.continuation + 1
    return model, [TextExample(e.title, e.ids[:end]) for e in examples], source


def journal_config(args: argparse.Namespace, protocol: DecodingProtocol) -> dict:
    """What every row depends on (a row's numbers, to the last bit, also on the windows decoded with it: the
    batch); the sizes and methods are in each row's key."""
    import transformers

    from ..data.fashion_mnist import sha256
    from ..pretrained.ar_models import ar_format, ar_weights

    fmt = ar_format(args.model)
    model = args.model if fmt is None else sha256(ar_weights(args.model))
    return {"protocol": protocol.journal_name, "model": model, "format": None if fmt is None else fmt.to_dict(),
            "video": args.video,
            "prompt": args.prompt, "continuation": args.continuation,
            "interval": args.interval, "batch": args.batch, "first": args.first,
            "torch": torch.__version__, "transformers": transformers.__version__, "code": code_fingerprint()}
