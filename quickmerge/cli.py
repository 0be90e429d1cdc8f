"""The ``quickmerge`` console command."""

from __future__ import annotations

import argparse
import json
import sys

from .cli_types import non_negative_int, positive_float, positive_int, share
from .errors import MissingDataError, MissingExtraError, UsageError


def _keep_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"--keep must lie in (0, 1], got {text}")
    return value


def _compression_ratio(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"--ratio must lie in (0, 1), got {text}")
    return value


FINETUNE_LR = 3e-4  # merge-aware fine-tuning starts from a trained model: a tenth of the training rate
FINETUNE_WARMUP = 50  # steps (an epoch is 429 steps of 128 images)
FINETUNE_EMA = 0.99  # an EMA that forgets the starting weights within the epoch


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command's parser. Given ``argv``, the arguments of ``eval``, ``visualize`` and ``train`` (whose choices come
    from modules that import torch) are added only to the command ``argv`` names, so that ``quickmerge --help`` or a
    mistyped command answers without importing torch; without it, every command's."""
    from . import __version__

    named = None if argv is None else next((word for word in argv if not word.startswith("-")), "")

    parser = argparse.ArgumentParser(prog="quickmerge", description="QuickMerge++ token merging for transformers.")
    parser.add_argument("--version", action="version", version=f"quickmerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="installed versions of every extra, and whether kvpress's presses can run here")
    demo = sub.add_parser("demo", help="a real causal LM answering from a QuickMerge++-compressed context")
    demo.add_argument("--ratio", type=_compression_ratio, default=0.5, help="share of KV entries removed, in (0, 1)")
    demo.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m, or an HF id/path")
    demo.add_argument("--html", default="results/demo_text.html", help="where to write the token rendering")
    demo.add_argument("--json", default=None, help="also write the reported figures to this JSON file")
    encoder = sub.add_parser("demo-encoder", help="merge a real encoder's tokens of real text and show what merged")
    encoder.add_argument("--text", default=None, help="text to compress (default: a Wikipedia article's opening)")
    encoder.add_argument("--keep", type=_keep_ratio, default=0.25, help="share of tokens to keep, in (0, 1]")
    evaluate = sub.add_parser("eval", help="run an evaluation protocol")
    if named in (None, "eval"):
        _add_eval_arguments(evaluate)
    show = sub.add_parser("visualize", help="draw which patches merged into which token, or the AR image / video "
                                            "models' completions (PNG)")
    if named in (None, "visualize"):
        _add_visualize_arguments(show)
    train = sub.add_parser("train", help="train a reference model")
    if named in (None, "train"):
        _add_train_arguments(train)
    return parser


def _add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    protocols = evaluate.add_subparsers(dest="protocol", required=True)
    from .eval.text_cli import add_arguments as add_text_arguments

    add_text_arguments(
        protocols.add_parser("text", help="continuation perplexity of a real LM on a compressed context")
    )
    from .eval.vision_cli import add_arguments as add_vision_arguments

    add_vision_arguments(protocols.add_parser("vision", help="top-1 vs throughput of the Fashion-MNIST ViT"))
    from .eval.passkey_cli import add_arguments as add_passkey_arguments

    add_passkey_arguments(protocols.add_parser(
        "passkey", help="exact-match retrieval of a passkey inserted once in a compressed long context"))
    from .eval.decoding_cli import add_arguments as add_decoding_arguments

    add_decoding_arguments(protocols.add_parser(
        "decoding", help="perplexity of a long continuation decoded with the cache merged (or evicted) back to a "
        "budget every few tokens"))
    from .eval.generative_cli import add_arguments as add_generative_arguments

    add_generative_arguments(protocols.add_parser(
        "image", help="bits per token of the AR image model completing test images from a compressed top"), "image")
    add_generative_arguments(protocols.add_parser(
        "video", help="bits per token of the AR video model's next frame given compressed previous ones"), "video")


def _add_visualize_arguments(show: argparse.ArgumentParser) -> None:
    from .eval.vision_cli import FLOOR, SCHEDULES, add_matching_arguments

    show.add_argument("--r", type=non_negative_int, default=24, help="tokens merged per block")
    add_matching_arguments(show, f", QuickMerge++ merging r per block until {FLOOR} tokens are left (ToMe-style's "
                                 "column then shows its most, half the tokens in every block)")
    show.add_argument("--schedule", choices=SCHEDULES, default="constant",
                      help="QuickMerge++'s budget at the cost of r per block: constant (r in every block), entropy "
                           "(per block, from the attention entropy on held-out training images) or per-image (each "
                           "image's from its content); ToMe-style's column stays at r")
    show.add_argument("--keep-order", action="store_true",
                      help="both columns keep the tokens in patch order inside the blocks (as eval vision "
                           "--keep-order, whose merges it then draws)")
    show.add_argument("--images", type=positive_int, default=4, help="Fashion-MNIST test images to show")
    show.add_argument("--no-photos", action="store_true", help="leave out scikit-image's photos")
    show.add_argument("--checkpoint", default=None, help="directory with model.safetensors + config.json (and a "
                      "fine-tune's token_scorer.safetensors, used by QuickMerge++)")
    show.add_argument("--out", default="results/visualize.png")
    shows = show.add_subparsers(dest="target", required=False, metavar="{image-ar,video-ar}",
                                help="instead of the ViT's merges: completions of the AR image / video model")
    for modality in ("image", "video"):
        ar_show = shows.add_parser(f"{modality}-ar", help=f"the AR {modality} model's completions, full context vs "
                                   "QuickMerge++ and the best kvpress press at each ratio (PNG)")
        ar_show.add_argument("--model", default=modality, help="model directory (default: the shipped one)")
        ar_show.add_argument("--examples", type=positive_int, default=6, help="held-out examples to draw")
        ar_show.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
        ar_show.add_argument("--results", default=f"results/{modality}.json",
                             help="eval JSON naming the best kvpress press per ratio (else ExpectedAttention)")
        ar_show.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        ar_show.add_argument("--method", default=None, help="the QuickMerge++ eval method drawn (default: the "
                             "modality's best in BENCHMARKS.md, DEFAULT_METHOD in quickmerge/eval/completions.py)")
        if modality == "video":
            ar_show.add_argument("--video", default=None,
                                 help="any clip OpenCV reads, or a .gz of one (default: held-out windows)")
        ar_show.add_argument("--out", default=f"docs/img/{modality}_ar_completions.png")


def _add_train_arguments(train: argparse.ArgumentParser) -> None:
    targets = train.add_subparsers(dest="target", required=True)
    vision = targets.add_parser("vision", help="the reference Fashion-MNIST ViT (as shipped in quickmerge/assets)")
    from .vision.token_merge import SALIENCY_RULES, SIMILARITIES
    from .vision.train import DEFAULT_OUT, Recipe

    defaults = Recipe()
    vision.add_argument("--epochs", type=positive_int, default=None,
                        help=f"default {defaults.epochs}; 1 with --finetune")
    vision.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                        help="global batch (all processes)")
    vision.add_argument("--lr", type=positive_float, default=None,
                        help=f"default {defaults.lr}; {FINETUNE_LR} with --finetune")
    vision.add_argument("--finetune", default=None, metavar="CKPT",
                        help="merge-aware fine-tuning of the checkpoint directory CKPT (e.g. quickmerge/assets/"
                        "fashion_vit) with merging in every block")
    vision.add_argument("--init", default=None, metavar="CKPT",
                        help="start from the weights of the checkpoint directory CKPT (a warm restart)")
    vision.add_argument("--method", choices=["quickmerge", "tome"], default="quickmerge",
                        help="--finetune: QuickMerge++ (differentiable merge) or ToMe-style matching")
    vision.add_argument("--r-per-block", "--r", dest="r", type=non_negative_int, default=None,
                        help="--finetune: tokens merged per block; under torchrun spell it --r-per-block "
                             "(torchrun reads --r as one of its own options)")
    vision.add_argument("--ratio", type=float, default=None, help="--finetune: share of patch tokens left at the end")
    vision.add_argument("--temperature", type=float, nargs=2, default=[1.0, 0.05], metavar=("START", "END"),
                        help="--finetune with quickmerge: Gumbel temperature, annealed from START to END")
    vision.add_argument("--self-distill", type=share, default=0.0, metavar="W",
                        help="--finetune: share of the loss matching the unmerged CKPT's predictions (0: labels only)")
    vision.add_argument("--learned-saliency", action="store_true",
                        help="--finetune with quickmerge: also learn a keep score per block (token_scorer.safetensors)")
    vision.add_argument("--scorer-lr-scale", type=float, default=1.0, metavar="X",
                        help="--learned-saliency: the keep scores learn at X times --lr")
    vision.add_argument("--similarity", choices=SIMILARITIES, default=None,
                        help="--finetune with quickmerge: what the matching compares, as quickmerge.patch's (hidden, "
                        "the default, or keys)")
    vision.add_argument("--saliency-rule", choices=SALIENCY_RULES, default=None,
                        help="--finetune with quickmerge: how saliency enters the matching, as quickmerge.patch's "
                        "(scaled, the default, or additive; additive with --learned-saliency)")
    vision.add_argument("--ema", type=float, default=None,
                        help=f"EMA decay of the weights (0: none); default {defaults.ema_decay}, "
                        f"{FINETUNE_EMA} with --finetune")
    vision.add_argument("--out", default=str(DEFAULT_OUT), help="output directory (the shipped model is replaced "
                        "only when asked: --out quickmerge/assets/fashion_vit)")
    vision.add_argument("--teacher-epochs", type=non_negative_int, default=None,
                        help=f"epochs of the CNN teacher distilled from (0: none); default {defaults.teacher_epochs}, "
                        "0 with --finetune")
    vision.add_argument("--seed", type=int, default=defaults.seed, help="data order, augmentation, Gumbel noise")
    vision.add_argument("--threads", type=positive_int, default=2, help="torch threads (per process)")
    vision.add_argument("--fresh", action="store_true", help="ignore the checkpoint of an interrupted run")
    from .ar.train import DEFAULT_OUT as AR_OUT
    from .ar.train import ARRecipe

    ar_defaults = ARRecipe()
    for modality, what in (("image", "Fashion-MNIST images, completed from their top rows"),
                           ("video", "opencv-doc clips and Moving Fashion-MNIST, next frame from three")):
        ar = targets.add_parser(f"ar-{modality}", help=f"the autoregressive {modality} model ({what})")
        ar.add_argument("--steps", type=positive_int, default=ar_defaults.steps)
        ar.add_argument("--batch-size", type=positive_int, default=ar_defaults.batch_size,
                        help="global batch of sequences")
        ar.add_argument("--lr", type=positive_float, default=ar_defaults.lr)
        ar.add_argument("--out", default=str(AR_OUT[modality]), help="output directory (the shipped model is "
                        f"replaced only when asked: --out quickmerge/assets/ar_{modality})")
        ar.add_argument("--threads", type=positive_int, default=2, help="torch threads (per process)")
        ar.add_argument("--fresh", action="store_true", help="ignore the checkpoint of an interrupted run")


def main(argv: list[str] | None = None) -> int:
    """Run the command; arguments refused after parsing, what is missing (an extra, data, a model package) and
    what is refused (a journal written under other settings) are reported in one line, as argparse reports
    its own refusals (``quickmerge eval text: error: ...``), with exit status 2."""
    args = build_parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
    from .eval.journal import ConfigMismatchError

    try:
        return _run(args)
    except (UsageError, MissingExtraError, MissingDataError, ConfigMismatchError) as err:
        print(f"{_prog(args)}: error: {err}", file=sys.stderr)
        return 2


def _prog(args: argparse.Namespace) -> str:
    """The command as typed, e.g. ``quickmerge eval video``."""
    words = [getattr(args, name, None) for name in ("command", "protocol", "target")]
    return " ".join(["quickmerge", *(w for w in words if w)])


def _run(args: argparse.Namespace) -> int:
    if args.command == "env":
        from .env_report import report

        print("\n".join(report()))
    elif args.command == "demo-encoder":
        from .demos.encoder_token_groups import run as run_encoder

        run_encoder(args.text, args.keep)
    elif args.command == "demo":
        from .demos.merged_kv_cache import run

        figures = run(args.ratio, args.model, args.html)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(figures, handle, indent=2)
    elif args.command == "eval" and args.protocol == "text":
        from .eval.text_cli import run as run_text

        run_text(args)
    elif args.command == "eval" and args.protocol == "vision":
        from .eval.vision_cli import run as run_vision

        run_vision(args)
    elif args.command == "eval" and args.protocol == "passkey":
        from .eval.passkey_cli import run as run_passkey

        run_passkey(args)
    elif args.command == "eval" and args.protocol == "decoding":
        from .eval.decoding_cli import run as run_decoding

        run_decoding(args)
    elif args.command == "eval":
        from .eval.generative_cli import run as run_generative

        run_generative(args, args.protocol)
    elif args.command == "visualize" and args.target is not None:
        from .eval.completions import run as draw_completions

        if not 1 <= args.examples <= 64 or not all(0 < r < 1 for r in args.ratios):
            raise UsageError("--examples must be in [1, 64] and --ratios in (0, 1)")
        modality = args.target.removesuffix("-ar")
        if args.method is not None:
            from .eval.generative_cli import MODALITY_METHODS
            from .eval.text_methods import OURS

            known = [m for m in OURS + MODALITY_METHODS[modality] if m.startswith("quickmerge")]
            if args.method not in known:
                raise UsageError(f"--method must be one of {', '.join(known)}; got {args.method!r}")
        path = draw_completions(modality, model_dir=args.model, count=args.examples, ratios=args.ratios,
                                results=args.results, out=args.out, sample=args.sample,
                                video=getattr(args, "video", None), method=args.method)
        print(f"wrote {path}")
    elif args.command == "visualize":
        if not 1 <= args.images <= 10_000 or args.r < 0:
            raise UsageError("--images must be in [1, 10000] and --r >= 0")
        from .data.fashion_mnist import load_fashion_mnist
        from .eval.vision_cli import load_for_merging, quickmerge_budget, quickmerge_options
        from .vision.visualize import load_photos, visualize

        model, scorer, _ = load_for_merging(args, [args.r], ["quickmerge"], flag="--r")
        images, labels = load_fashion_mnist("test")
        photos = None if args.no_photos else load_photos()
        path = visualize(model, images[: args.images], labels[: args.images], args.out, r=args.r, photos=photos,
                         scorer=scorer, options={"matching": args.matching, **quickmerge_options(args)},
                         keep_order=args.keep_order, **quickmerge_budget(model, args.schedule, args.r, args.matching))
        print(f"wrote {path}")
    elif args.command == "train":
        import torch

        from . import distributed
        from .pretrained.fashion_vit import REFERENCE_CONFIG
        from .vision.train import Recipe
        from .vision.train import train as train_vision

        torch.set_num_threads(args.threads)
        ctx = distributed.setup()
        try:
            if args.target == "vision":
                finetune = None
                if args.finetune is not None:
                    from .vision.train import FineTune

                    try:
                        finetune = FineTune(args.finetune, args.method, args.r, args.ratio, *args.temperature,
                                            self_distill=args.self_distill, learned_saliency=args.learned_saliency,
                                            scorer_lr_scale=args.scorer_lr_scale, similarity=args.similarity,
                                            saliency_rule=args.saliency_rule)
                    except ValueError as err:
                        raise UsageError(f"--finetune: {err}") from None
                try:
                    recipe = Recipe(
                        epochs=(1 if finetune else Recipe.epochs) if args.epochs is None else args.epochs,
                        lr=(FINETUNE_LR if finetune else Recipe.lr) if args.lr is None else args.lr,
                        batch_size=args.batch_size,
                        ema_decay=(FINETUNE_EMA if finetune else Recipe.ema_decay) if args.ema is None else args.ema,
                        teacher_epochs=(0 if finetune else Recipe.teacher_epochs) if args.teacher_epochs is None
                        else args.teacher_epochs,
                        warmup_steps=FINETUNE_WARMUP if finetune else Recipe.warmup_steps, seed=args.seed)
                except ValueError as err:
                    raise UsageError(str(err)) from None
                if finetune is None and args.self_distill:
                    raise UsageError("--self-distill applies to --finetune only")
                if finetune is None and args.learned_saliency:
                    raise UsageError("--learned-saliency applies to --finetune only")
                if finetune is None and (args.similarity, args.saliency_rule) != (None, None):
                    raise UsageError("--similarity and --saliency-rule apply to --finetune only")
                if finetune is not None and args.teacher_epochs:
                    raise UsageError("--finetune uses no teacher; drop --teacher-epochs")
                if args.init is not None and finetune is not None:
                    raise UsageError("--init and --finetune exclude each other")
                train_vision(args.out, recipe=recipe, config=REFERENCE_CONFIG, ctx=ctx, fresh=args.fresh,
                             finetune=finetune, init=args.init)
            else:
                from .ar.train import ARRecipe, train_ar

                ar_recipe = ARRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr)  # checked by argparse
                train_ar(args.target.removeprefix("ar-"), args.out, recipe=ar_recipe, ctx=ctx, fresh=args.fresh)
        finally:
            ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
