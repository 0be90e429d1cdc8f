"""``quickmerge eval vision``: the image protocol end to end, JSON and PNG out."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..cli_types import non_negative_float, positive_int
from ..env_report import installed_versions
from ..errors import UsageError
from ..vision.budget import DEFAULT_FLOOR
from ..vision.patch import DEFAULT_SALIENCY_QUERIES, MATCHING_DEFAULTS, non_default_matching, recorded_matching
from ..vision.token_merge import METHODS, SALIENCY_RULES, SALIENCY_SOURCES, SIMILARITIES
from ..vision.token_scorer import FILENAME as SCORER_FILE
from ..vision.token_scorer import TokenScorer
from .journal import Journal, code_fingerprint
from .vision import TIMINGS

DEFAULT_R = (16, 24, 32, 40, 48)  # r = 48 passes 2x the unpatched throughput on the shipped ViT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="merging methods to sweep")
    parser.add_argument("--r-values", "--r", dest="r", type=positive_int, nargs="+", default=list(DEFAULT_R),
                        help="values of r (tokens merged per block, at most half the patch tokens) to sweep; under "
                             "torchrun spell it --r-values (torchrun reads --r as one of its own options)")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES),
                        help="constant: r in every block; entropy: QuickMerge++'s per-block budget from attention "
                        "entropy on held-out training images, at each constant r's cost; per-image: each image's "
                        "budget from the entropy of its content, run in sub-batches bucketed by budget, at each "
                        "constant r's mean cost (both quickmerge only)")
    add_matching_arguments(parser, ", and every quickmerge, random and pool schedule (constant, entropy, "
                                   f"per-image) runs down to a floor of {FLOOR} tokens (tome stays bipartite)")
    parser.add_argument("--keep-order", action="store_true",
                        help="every method keeps the tokens in patch order inside the blocks (quickmerge.patch's "
                             "keep_order); default: bipartite matching's own order, one alternate set's kept tokens "
                             "before the other set")
    parser.add_argument("--images", type=positive_int, default=10_000, help="test images (default: all 10,000)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="the model's and the images' dtype (bfloat16 / float16: as on a GPU; the entropy and "
                             "per-image budgets are calibrated in float32 first)")
    parser.add_argument("--timing", choices=TIMINGS, default="together",
                        help="together (default): after every accuracy pass, all settings timed in rounds whose order "
                        "rotates, each right before the unpatched model, so all see the same stretch of the machine's "
                        "drift; paired: each setting timed against the unpatched model in rounds of its own, right "
                        "after its accuracy pass (the protocol before stop 48)")
    parser.add_argument("--timing-rounds", type=positive_int, default=None,
                        help="timings of each setting (default: 15 together, 5 paired); the speed-up is the median "
                        "of the rounds' ratios")
    parser.add_argument("--checkpoint", default=None, help="directory with model.safetensors + config.json (and "
                        "token_scorer.safetensors after a --learned-saliency fine-tune: QuickMerge++ rows then use it)")
    parser.add_argument("--out", default="results/vision", help="output prefix (.json and .png are added)")
    parser.add_argument("--fresh", action="store_true", help="discard the rows of an interrupted run and start over")


SCHEDULES = ("constant", "entropy", "per-image")
DTYPES = ("float32", "bfloat16", "float16")
MATCHINGS = ("bipartite", "greedy")
FLOOR = DEFAULT_FLOOR  # fewest tokens a greedy schedule leaves
CALIBRATION_IMAGES = 512  # held-out training images (the last 5,000 of the split) for the entropy schedule


def add_matching_arguments(parser: argparse.ArgumentParser, greedy_help: str) -> None:
    """QuickMerge++'s matching options, :func:`~quickmerge.vision.patch.patch`'s settings of the same names;
    ``greedy_help`` ends the sentence on what greedy matching does to the command's schedules."""
    parser.add_argument("--matching", choices=MATCHINGS, default="bipartite",
                        help="QuickMerge++'s matching. bipartite: ToMe's alternating sets, a block merges at most half "
                             "its tokens; greedy: no such cap, so r may pass half the patch tokens" + greedy_help)
    parser.add_argument("--saliency-rule", choices=SALIENCY_RULES, default=None,
                        help="how QuickMerge++'s saliency enters the matching (quickmerge.patch's saliency_rule): "
                             "scaled (default: edge costs scaled by attention, the measured weight 0.125) or "
                             "additive (the saliency rank subtracted; the default before stop 72, and with a "
                             "learned saliency)")
    parser.add_argument("--saliency-weight", type=non_negative_float, default=None,
                        help="QuickMerge++'s saliency weight (quickmerge.patch's saliency_weight; default: the "
                             "rule's, 0.5 additive, 0.125 scaled; 0: no saliency in the matching)")
    parser.add_argument("--similarity", choices=SIMILARITIES, default=MATCHING_DEFAULTS["similarity"],
                        help="what QuickMerge++'s matching compares (quickmerge.patch's similarity): hidden (default: "
                             "the residual stream that is merged) or keys (as ToMe; the default before stop 72)")
    parser.add_argument("--saliency", choices=SALIENCY_SOURCES, default="cls",
                        help="which queries QuickMerge++'s saliency asks (quickmerge.patch's saliency): cls (default: "
                             "the class token's; a model without one asks spread queries), queries "
                             "(--saliency-queries queries spread over the patches) or mean (one query, the mean of "
                             "all)")
    parser.add_argument("--saliency-queries", type=positive_int, default=DEFAULT_SALIENCY_QUERIES,
                        help="how many spread queries the queries saliency asks (quickmerge.patch's "
                             f"saliency_queries; default {DEFAULT_SALIENCY_QUERIES})")


def build_sweep(methods: list[str], rs: list[int], schedules: list[str] | None = None,
                perplexity: list[float] | None = None, num_tokens: int = 196,
                image_budgets: dict[int, dict] | None = None, matching: str = "bipartite",
                num_layers: int | None = None, quickmerge_options: dict[str, Any] | None = None,
                keep_order: bool = False) -> list[tuple[str, Any, dict[str, Any]]]:
    """(method, r, settings): constant r per method, then QuickMerge++'s entropy schedules and per-image budgets.

    ``image_budgets``: r -> :class:`~quickmerge.vision.image_budget.ImageBudget` dict, needed
    for the "per-image" schedule. ``matching="greedy"``: QuickMerge++ merges greedily, and every
    schedule except ToMe-style's runs as a per-block list down to :data:`FLOOR` tokens (``num_layers`` blocks).
    ``quickmerge_options``: more :func:`~quickmerge.vision.patch.patch` settings of every QuickMerge++ row (only
    those that differ from the defaults, so rows keep their journal keys), e.g. ``{"similarity": "hidden"}``.
    ``keep_order``: every row keeps its tokens in patch order (its settings say so only when True).
    """
    from ..vision.budget import constant_schedule, entropy_schedule

    schedules = schedules or ["constant"]
    greedy = matching == "greedy"
    if greedy and num_layers is None:
        raise ValueError("greedy schedules need the model's number of blocks")
    options = {"matching": "greedy", **(quickmerge_options or {})} if greedy else dict(quickmerge_options or {})

    def constant(method: str, r: int) -> tuple[str, Any, dict[str, Any]]:
        if not greedy or method == "tome":
            return method, r, options if method == "quickmerge" else {}
        schedule = constant_schedule(num_tokens, r, num_layers, FLOOR, bipartite=False)
        return method, schedule, options if method == "quickmerge" else {}

    sweep: list[tuple[str, Any, dict[str, Any]]] = []
    if "constant" in schedules:
        sweep += [constant(m, r) for m in methods for r in rs]
    if "entropy" in schedules and "quickmerge" in methods:
        if perplexity is None:
            raise ValueError("the entropy schedule needs the blocks' attention perplexity")
        sweep += [("quickmerge", entropy_schedule(perplexity, num_tokens, r, floor=FLOOR, bipartite=not greedy),
                   {"label": "quickmerge-entropy", **options}) for r in rs]
    if "per-image" in schedules and "quickmerge" in methods:
        if image_budgets is None:
            raise ValueError("the per-image schedule needs calibrated image budgets")
        sweep += [("quickmerge", r, {"label": "quickmerge-per-image", "image_budget": image_budgets[r], **options})
                  for r in rs]
    if keep_order:
        sweep = [(method, r, {**settings, "keep_order": True}) for method, r, settings in sweep]
    return sweep


def calibration_images() -> torch.Tensor:
    """:data:`CALIBRATION_IMAGES` held-out training images (the split's last 5,000), model-ready."""
    from ..data.fashion_mnist import load_fashion_mnist, normalize

    images, _ = load_fashion_mnist("train")
    return normalize(images[-5_000:][:CALIBRATION_IMAGES])


def calibrate(model: Any) -> list[float]:
    """Attention perplexity per block on the calibration images."""
    from ..vision.budget import block_attention_perplexity

    return block_attention_perplexity(model, calibration_images())


def quickmerge_budget(model: Any, schedule: str, r: int, matching: str = "bipartite") -> dict[str, Any]:
    """:func:`~quickmerge.vision.visualize.visualize`'s QuickMerge++ budget for one of :data:`SCHEDULES` at the
    cost of a constant ``r``: ``{}`` (constant), ``{"schedule": [L]}`` or ``{"image_budget": ImageBudget}``,
    calibrated as ``eval vision`` calibrates them."""
    from ..vision.budget import entropy_schedule
    from ..vision.image_budget import ImageBudget

    if schedule == "entropy":
        return {"schedule": entropy_schedule(calibrate(model), model.patch_embed.num_patches, r, floor=FLOOR,
                                             bipartite=matching == "bipartite")}
    if schedule == "per-image":
        return {"image_budget": ImageBudget(**calibrate_image_budgets(model, [r], matching)[r])}
    if schedule != "constant":
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return {}


def calibrate_image_budgets(model: Any, rs: list[int], matching: str = "bipartite") -> dict[int, dict]:
    """Per-image budgets (4 buckets) for each constant r, on the calibration images."""
    from ..vision.image_budget import ImageBudget

    patch_size = model.patch_embed.patch_size[0]
    images = calibration_images()
    return {r: ImageBudget.calibrate(images, patch_size=patch_size, num_tokens=model.patch_embed.num_patches,
                                     num_layers=len(model.blocks), r=r, floor=FLOOR,
                                     bipartite=matching == "bipartite").to_dict() for r in rs}


def run(args: argparse.Namespace) -> dict:
    from ..data.fashion_mnist import load_fashion_mnist
    from .report import write_report
    from .timing import warn_if_stolen
    from .vision import compare_at_tome_speeds, plot_vision_eval, run_vision_eval

    if not 1 <= args.images <= 10_000:
        raise UsageError(f"--images must be in [1, 10000], got {args.images}")
    torch.set_num_threads(args.threads)
    model, scorer, tuned_for = load_for_merging(args, args.r, args.methods)
    images, labels = load_fashion_mnist("test")
    images, labels = images[: args.images], labels[: args.images]
    ctx = distributed.setup()
    try:
        model.to(ctx.device)
        journal = Journal(args.out, journal_config(args, ctx.device), rank=ctx.rank, fresh=args.fresh)
        perplexity = calibrate(model) if "entropy" in args.schedules else None
        budgets = calibrate_image_budgets(model, args.r, args.matching) if "per-image" in args.schedules else None
        model.to(getattr(torch, args.dtype))
        sweep = build_sweep(args.methods, args.r, args.schedules, perplexity, model.patch_embed.num_patches, budgets,
                            args.matching, len(model.blocks), quickmerge_options(args), args.keep_order)
        rows = run_vision_eval(model, images, labels, sweep, batch_size=args.batch_size,
                               timing_rounds=timing_rounds(args), timing=args.timing, journal=journal, ctx=ctx,
                               scorer=scorer)
    finally:
        ctx.close()
    if rows is None:
        return {}  # not rank 0: rank 0 writes the results
    results = {
        "rows": rows,
        "quickmerge_vs_tome": compare_at_tome_speeds(rows),
        "quickmerge_entropy_vs_tome": compare_at_tome_speeds(rows, "quickmerge-entropy"),
        "quickmerge_entropy_vs_constant": compare_at_tome_speeds(rows, "quickmerge-entropy", "quickmerge"),
        "quickmerge_per_image_vs_tome": compare_at_tome_speeds(rows, "quickmerge-per-image"),
        "quickmerge_per_image_vs_constant": compare_at_tome_speeds(rows, "quickmerge-per-image", "quickmerge"),
        "block_attention_perplexity": perplexity,
        "config": {**vars(args), "learned_saliency": scorer is not None,
                   "fine_tuned_merging": tuned_for, "processes": ctx.world,
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
                   "versions": installed_versions()},
    }
    title = f"Fashion-MNIST ViT, {len(images)} test images"
    paths = write_report(results, args.out, lambda png: plot_vision_eval(rows, png, title, results))
    print(format_table(rows))
    comparisons = format_comparisons(results)
    if comparisons:
        print("\n" + comparisons)
    warn_if_stolen(rows)
    print(f"\nwrote {paths[0]} and {paths[1]}")
    return results


def learned_saliency(checkpoint: str | None, model: torch.nn.Module) -> TokenScorer | None:
    """The learned saliency saved beside a fine-tuned ``checkpoint`` for its ``model`` (announced on stderr), or None;
    one that does not fit the model is refused before any work."""
    if checkpoint is None or not TokenScorer.saved_in(checkpoint):
        return None
    scorer = TokenScorer.load(checkpoint)
    if (scorer.num_layers, scorer.dim) != (len(model.blocks), model.embed_dim):
        raise UsageError(f"--checkpoint: {SCORER_FILE} holds a scorer for {scorer.num_layers} blocks of width "
                         f"{scorer.dim}, the model has {len(model.blocks)} of width {model.embed_dim}")
    print(f"QuickMerge++ merges with the learned saliency in {Path(checkpoint) / SCORER_FILE}", file=sys.stderr)
    return scorer


def quickmerge_options(args: argparse.Namespace) -> dict[str, Any]:
    """The QuickMerge++ settings of the command line that differ from :func:`~quickmerge.vision.patch.patch`'s."""
    return non_default_matching({k: getattr(args, k) for k in MATCHING_DEFAULTS})


def announce_fine_tuned_merging(checkpoint: str | None) -> dict | None:
    """Say on stderr which merging ``checkpoint`` was fine-tuned with (None: it was not); returns that setting."""
    from ..pretrained.fashion_vit import fine_tuned_merging

    setting = fine_tuned_merging(checkpoint)
    if setting is not None:
        setting = recorded_matching(setting)
        budget = f"r = {setting['r']} per block" if setting.get("r") else f"ratio = {setting['ratio']}"
        options = "".join(f", {k} = {v}" for k, v in non_default_matching(setting).items())
        print(f"--checkpoint {checkpoint} was fine-tuned merging with {setting['method']} at {budget}{options} (its "
              "config.json): fine-tuning at a budget specialises a model to it, so rows at other settings, the "
              "unmerged one included, measure it away from what it was tuned for", file=sys.stderr)
    return setting


def timing_rounds(args: argparse.Namespace) -> int:
    """``--timing-rounds``, or its default for ``--timing``."""
    return args.timing_rounds or (15 if args.timing == "together" else 5)


def check_r_values(rs: list[int], methods: list[str], matching: str, num_tokens: int, flag: str = "--r-values") -> None:
    """Refuse an r that would run as a smaller one (a silent truncation), naming the cap that applies."""
    most = num_tokens // 2  # bipartite matching (ToMe's, ours by default) merges at most half the tokens
    capped = ({"tome"} if matching == "greedy" else {"quickmerge", "tome"}) & set(methods)
    if max(rs) > most and capped:
        hint = "" if matching == "greedy" else "; --matching greedy lifts the cap for quickmerge"
        raise UsageError(f"{flag}: a block of this model merges at most {most} of its {num_tokens} patch tokens by "
                         f"bipartite matching ({', '.join(sorted(capped))}), so r above {most} runs as r = {most}; "
                         f"got {max(rs)}{hint}")
    if max(rs) > num_tokens - FLOOR:
        raise UsageError(f"{flag}: every block keeps at least {FLOOR} of the {num_tokens} patch tokens, so r above "
                         f"{num_tokens - FLOOR} runs as r = {num_tokens - FLOOR}; got {max(rs)}")


def check_saliency_queries(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """Refuse a ``--saliency-queries`` that no spread query would use: the class token's saliency or the mean
    query's asks none."""
    if args.saliency_queries == DEFAULT_SALIENCY_QUERIES:
        return
    spread = args.saliency == "queries" or (args.saliency == "cls" and getattr(model, "cls_token", None) is None)
    if not spread:
        raise UsageError(f"--saliency-queries {args.saliency_queries}: the {args.saliency} saliency of this model "
                         "asks no spread queries; add --saliency queries")


def load_for_merging(args: argparse.Namespace, rs: list[int], methods: list[str],
                     flag: str = "--r-values") -> tuple[torch.nn.Module, TokenScorer | None, dict | None]:
    """The ViT of ``--checkpoint`` (the shipped one by default), its learned saliency and the merging it was
    fine-tuned with (announced on stderr); ``rs`` and the matching options are checked against them before any
    data is read."""
    from ..pretrained.fashion_vit import load_fashion_vit

    model = load_fashion_vit(args.checkpoint)
    scorer = learned_saliency(args.checkpoint, model)
    if scorer is not None and args.saliency_rule == "scaled":
        raise UsageError(f"--checkpoint holds a learned saliency, trained with the additive rule; --saliency-rule "
                         f"{args.saliency_rule} takes none")
    tuned_for = announce_fine_tuned_merging(args.checkpoint)
    check_r_values(rs, methods, args.matching, model.patch_embed.num_patches, flag)
    check_saliency_queries(args, model)
    return model, scorer, tuned_for


def journal_config(args: argparse.Namespace, device: torch.device | str = "cpu") -> dict:
    """What every row depends on (``device``: where the rows are computed): rows computed under other settings are
    never mixed in."""
    from ..data.fashion_mnist import sha256
    from ..pretrained.fashion_vit import ASSET_DIR

    weights = Path(args.checkpoint or ASSET_DIR) / "model.safetensors"
    scorer = Path(args.checkpoint or ASSET_DIR) / SCORER_FILE
    return {"protocol": "vision", "weights": sha256(weights) if weights.is_file() else str(weights),
            "scorer": sha256(scorer) if scorer.is_file() else None,
            "images": args.images, "batch_size": args.batch_size, "timing": args.timing,
            "timing_rounds": timing_rounds(args),
            "threads": args.threads, "dtype": args.dtype, "device": str(device),
            "torch": torch.__version__, "code": code_fingerprint()}


COMPARISONS = {  # the results' comparison keys, as printed
    "quickmerge_vs_tome": "QuickMerge++ minus ToMe-style, at ToMe-style's speed-ups",
    "quickmerge_entropy_vs_tome": "QuickMerge++'s entropy schedule minus ToMe-style, at ToMe-style's speed-ups",
    "quickmerge_entropy_vs_constant": "the entropy schedule minus QuickMerge++'s constant r, at constant r's speed-ups",
    "quickmerge_per_image_vs_tome": "QuickMerge++'s per-image budget minus ToMe-style, at ToMe-style's speed-ups",
    "quickmerge_per_image_vs_constant": "the per-image budget minus QuickMerge++'s constant r, at constant r's "
                                        "speed-ups",
}


def format_comparisons(results: dict) -> str:
    """One paragraph per comparison that has points: top-1 difference in points at each reference speed-up, with
    its paired 95% interval where the rows carry their hits."""
    blocks = []
    for key, title in COMPARISONS.items():
        points = [c for c in results.get(key) or [] if c["difference"] is not None]
        if points:
            blocks.append(f"{title} (top-1 points [paired 95% interval]):\n" + "\n".join(
                f"  {c['speedup']:.2f}x (r = {c['r']}): {100 * c['difference']:+.2f}"
                + (f" [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]" if "low" in c else "") for c in points))
    return "\n".join(blocks)


def format_table(rows: list[dict]) -> str:
    """Markdown table of every setting."""
    lines = ["| method | r | top-1 % | speed-up | images/s | unpatched images/s | mean tokens |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['r']} | {100 * row['accuracy']:.2f} | {row['speedup']:.2f}x | "
                     f"{row['images_per_s']:.0f} | {row['unpatched_images_per_s']:.0f} | "
                     f"{row['mean_tokens_per_layer']:.1f} |")
    return "\n".join(lines)
