"""``quickmerge eval image`` / ``eval video``: likelihood of a continuation given a compressed context.

Same harness, methods, journal and summary schema as ``eval text``; rows also carry
``bits_per_token`` (mean continuation NLL in bits).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

from .. import distributed
from ..env_report import installed_versions
from ..errors import UsageError
from .cli_common import add_press_run_arguments, check_press_run_arguments
from .journal import Journal, code_fingerprint


def add_arguments(parser: argparse.ArgumentParser, modality: str) -> None:
    parser.add_argument("--model", default=modality, help=f"directory of a trained model (default: the shipped "
                        f"ar_{modality} model)")
    parser.add_argument("--examples", type=int, default=None, help="held-out " + (
        "test images (default 40)" if modality == "image"
        else "4-frame windows (default 40; with --video, every window of the clip, at most 40)"))
    if modality == "video":
        parser.add_argument("--video", default=None, help="any clip OpenCV reads, or a .gz of one (default: held-out "
                            "frames of the training clips and held-out Moving Fashion-MNIST)")
    add_press_run_arguments(parser, ratios=[0.25, 0.5, 0.75], out=f"results/{modality}",
                            extra_methods=MODALITY_METHODS[modality])


# Video-aware variants of ours, built for the model's frame size: spans along time over one
# location in consecutive frames, in the KV cache or on the prompt's hidden states.
VIDEO_METHODS = ["quickmerge-time", "quickmerge-time-align", "quickmerge-input-time", "quickmerge-frame"]
# Image-aware variant: spans down each column (one pixel location through consecutive rows), the
# image analogue of spans along time; recent rows stay apart, older rows merge vertically.
IMAGE_METHODS = ["quickmerge-columns", "quickmerge-replay-row"]
MODALITY_METHODS = {"image": IMAGE_METHODS, "video": VIDEO_METHODS}
INPUT_LAYER = 0  # the AR models have 4 layers: the input press merges after the first
DEFAULT_EXAMPLES = 40


def ar_method(name: str, fmt: object) -> object:
    """The :class:`~quickmerge.eval.text.Method` of ``name`` for an AR model of format ``fmt``.

    ``quickmerge-input`` merges after layer :data:`INPUT_LAYER` (its text default, layer 4,
    is past these models' depth); :data:`VIDEO_METHODS` use ``fmt``'s frame size and
    :data:`IMAGE_METHODS` its row width; the rest are the text protocol's methods unchanged.
    """
    from ..text import QuickMergeInputPress, QuickMergePress
    from .text import Method
    from .text_methods import REPLAY_PROPORTIONAL, build_method

    period = fmt.tokens_per_frame
    row = fmt.width // fmt.patch
    makers = {
        # replay scoring, and the context's last row always kept: the next row reads it most (chosen on held-out
        # training-split images, docs/results/issue12/ar_dev.json; on video windows a kept tail did not help there)
        "quickmerge-replay-row": lambda r: QuickMergePress(compression_ratio=r, **REPLAY_PROPORTIONAL, recent=row),
        "quickmerge-columns": lambda r: QuickMergePress(compression_ratio=r, mode="spans", time_period=row,
                                                        time_offset=1),
        "quickmerge-input": lambda r: QuickMergeInputPress(compression_ratio=r, layer=INPUT_LAYER),
        # the whole last context frame as the observation window: the next frame reads all of it
        "quickmerge-frame": lambda r: QuickMergePress(compression_ratio=r, window=period),
        "quickmerge-time": lambda r: QuickMergePress(compression_ratio=r, mode="spans", time_period=period,
                                                     time_offset=1),
        "quickmerge-time-align": lambda r: QuickMergePress(compression_ratio=r, mode="spans", time_period=period,
                                                           time_offset=1, align=True),
        # merges the frames' token embeddings before the first layer, along time (video-token pruning's place)
        "quickmerge-input-time": lambda r: QuickMergeInputPress(compression_ratio=r, layer=-1,
                                                                time_period=period, time_offset=1),
    }
    return Method(name, makers[name], decode_inside=True) if name in makers else build_method(name)


def run(args: argparse.Namespace, modality: str) -> dict:
    from ..pretrained.ar_models import load_ar
    from .generative import add_bits_per_token, image_examples, video_examples
    from .report import write_report
    from .text import plot_text_eval, run_text_eval
    from .text_cli import format_table
    from .text_methods import build_method, default_methods

    video = getattr(args, "video", None)
    if args.examples is None and video is None:
        args.examples = DEFAULT_EXAMPLES
    check_press_run_arguments(args, args.examples, "--examples")  # None: every window of the clip, counted below
    if video is not None and not Path(video).is_file():
        raise UsageError(f"--video: no file at {video}")
    names = args.methods or default_methods() + MODALITY_METHODS[modality]
    for name in names:  # fail fast on a missing extra, before loading anything
        if name not in MODALITY_METHODS[modality]:
            build_method(name)
    torch.set_num_threads(args.threads)
    ctx = distributed.setup()
    try:
        model, tokenizer, fmt = load_ar(args.model)
        model.to(ctx.device)
        methods = [ar_method(n, fmt) for n in names]
        try:  # fewer test images or windows than asked for, a clip without a whole window
            if modality == "image":
                examples = image_examples(fmt, tokenizer, args.examples)
            else:
                examples = video_examples(fmt, tokenizer, args.examples, video, at_most=DEFAULT_EXAMPLES)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if modality == "video" and args.examples is None:
            if len(examples) < 2:
                raise UsageError(f"--video: {video} holds {len(examples)} window(s) of {fmt.frames} frames; "
                                 "the bootstrap intervals need at least 2")
            args.examples = len(examples)
            if ctx.main:
                print(f"{Path(video).name}: {len(examples)} windows of {fmt.frames} frames")
        journal = Journal(args.out, journal_config(args, modality, fmt), rank=ctx.rank, fresh=args.fresh)
        results = run_text_eval(model, examples, methods, args.ratios, fmt.context, journal=journal, ctx=ctx)
    finally:
        ctx.close()
    if results is None:
        return {}
    add_bits_per_token(results["summary"])
    results["format"] = fmt.to_dict()
    results["config"] = {**vars(args), "modality": modality, "processes": ctx.world, "torch": torch.__version__,
                         "platform": platform.platform(),
                         "versions": installed_versions()}
    source = f"clip {Path(video).name}" if video else ("test images" if modality == "image" else "held-out windows")
    title = f"AR {modality} model: {args.examples} {source} (C = {fmt.context}, T = {fmt.continuation})"
    paths = write_report(results, args.out, lambda png: plot_text_eval(results, png, title))
    print(format_table(results))
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return results


def journal_config(args: argparse.Namespace, modality: str, fmt: object) -> dict:
    """What every row depends on: model weights, data source, format, code and library versions."""
    import transformers

    from ..data.fashion_mnist import sha256
    from ..pretrained.ar_models import ar_weights

    return {"protocol": modality, "model": sha256(ar_weights(args.model)),
            "format": fmt.to_dict(),
            "video": getattr(args, "video", None), "torch": torch.__version__,
            "transformers": transformers.__version__, "code": code_fingerprint()}
