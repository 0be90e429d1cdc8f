"""Where a merge step's time goes: QuickMerge++ against ToMe-style inside the small VideoMAE of stops 67-69, or
inside the shipped reference ViT.

    python benchmarks/merge_step_profile.py --model results/s67/videomae_fashion --r 32 --forwards 6 \
        --json results/s69/merge_step_profile_r32_f6.json
    python benchmarks/merge_step_profile.py --family fashion-vit --r 48 --forwards 6 --json OUT.json
    python benchmarks/merge_step_profile.py --family fashion-vit-hf --r 48 --forwards 6 --operators 12 --json OUT.json

``torch.profiler`` over forwards of ``video_vit_fashion.py``'s model (a fresh initialisation unless ``--model`` names
a trained one; the weights change which tokens merge, hardly the cost) on a batch of its test clips, or with
``--family fashion-vit`` of the reference ViT (timm) on the first test images, each method at the same r
(``fashion-vit-hf``: the same model converted into Hugging Face's ``ViTForImageClassification``, SDPA).
Profiled forwards run slower than timed ones, and a run of 3 forwards may carry noise outside the merge step:
compare the merge step's pieces, or give more ``--forwards``.
The merge step's pieces, as ``quickmerge.vision.patch`` calls them, are wrapped in ``record_function`` labels for the
run; the report is milliseconds per forward (CPU total, children included) of each piece and of the whole forward,
for both methods, and QuickMerge++ minus ToMe-style. ``--operators K`` adds, for the unpatched model and each
method, the K operators with the most self CPU time per forward (for comparing one family's forward with another's).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import platform
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import quickmerge
from quickmerge.cli_types import non_negative_int, positive_int
from quickmerge.data.fashion_mnist import load_fashion_mnist

patch_module = importlib.import_module("quickmerge.vision.patch")  # the package exports a function of that name
token_merge = importlib.import_module("quickmerge.vision.token_merge")

# the functions of one merge step, by the module that calls them and the name it calls them by
PIECES = (
    (patch_module, ("attention_saliency", "quickmerge_bipartite_assign", "tome_assign", "weighted_mean", "group_sum",
                    "in_first_member_order")),
    (token_merge, ("removal_penalty", "scaled_cost", "bipartite_round")),  # the additive / the scaled rule
    (patch_module.MergeHandle, ("merge",)),
)
NAMES = tuple(name for _, names in PIECES for name in names)
LABELS = {"merge": "merge step (whole)"}
FORWARD = "forward (whole)"


@torch.inference_mode()
def profile_method(model: torch.nn.Module, x: torch.Tensor, method: str | None, r: int, forwards: int,
                   operators: int = 0, **settings) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per forward of each labelled piece and of the whole forward (``settings``: more of ``patch``'s),
    and of the ``operators`` operators with the most self CPU time. ``method=None``: the unpatched model."""
    call = (lambda: model(pixel_values=x)) if hasattr(model, "config") else (lambda: model(x))  # HF or timm
    with quickmerge.patch(model, r=r, method=method, **settings) if method else contextlib.nullcontext():
        call()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                with record_function(FORWARD):
                    call()
    events = prof.key_averages()
    totals = {e.key: e.cpu_time_total / 1e3 / forwards for e in events}
    ops = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    return ({name: totals.get(name, 0.0) for name in (FORWARD, *(LABELS.get(n, n) for n in NAMES))},
            {e.key: e.self_cpu_time_total / 1e3 / forwards for e in ops[:operators]})


def labelled(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def labelled_pieces():
    """Wrap each piece of :data:`PIECES` in a ``record_function`` label; the originals are back on exit."""
    originals = [(module, name, getattr(module, name)) for module, names in PIECES for name in names]
    try:
        for module, name, fn in originals:
            setattr(module, name, labelled(LABELS.get(name, name), fn))
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=("videomae", "fashion-vit", "fashion-vit-hf"), default="videomae",
                    help="video_vit_fashion.py's VideoMAE (default), the shipped reference ViT (timm) or that ViT "
                         "converted into Hugging Face's ViTForImageClassification")
    ap.add_argument("--model", default=None, help="a trained video_vit_fashion.py model (default: fresh weights)")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--forwards", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--saliency-queries", type=positive_int, default=None,
                    help="QuickMerge++'s (patch's saliency_queries)")
    ap.add_argument("--saliency", choices=token_merge.SALIENCY_SOURCES, default=None,
                    help="QuickMerge++'s (patch's saliency)")
    ap.add_argument("--operators", type=non_negative_int, default=0,
                    help="also the unpatched model, and per method the K operators with the most self CPU time")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.family != "videomae" and args.model:
        ap.error(f"--model names a VideoMAE; --family {args.family} profiles the shipped reference ViT")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    items, labels = load_fashion_mnist("test")
    if args.family.startswith("fashion-vit"):
        from quickmerge.data.fashion_mnist import normalize
        from quickmerge.pretrained.fashion_vit import as_hf_vit, load_fashion_vit

        model, x = load_fashion_vit(), normalize(items[: args.batch])
        if args.family == "fashion-vit-hf":
            model = as_hf_vit(model, "ViTForImageClassification")
    else:
        import transformers
        from video_vit_fashion import clips, config  # a sibling script: run this one from the repository root

        if args.model:
            model = transformers.VideoMAEForVideoClassification.from_pretrained(args.model, attn_implementation="sdpa")
        else:
            model = transformers.VideoMAEForVideoClassification(config())
        x, _ = clips(items, labels, args.batch, seed=0)
    model.eval()
    with labelled_pieces():
        ours = {key: value for key, value in (("saliency_queries", args.saliency_queries),
                                              ("saliency", args.saliency)) if value is not None}
        runs = {"tome": profile_method(model, x, "tome", args.r, args.forwards, args.operators),
                "quickmerge": profile_method(model, x, "quickmerge", args.r, args.forwards, args.operators, **ours)}
        if args.operators:
            runs["unpatched"] = profile_method(model, x, None, args.r, args.forwards, args.operators)
    rows = [{"piece": name, "tome_ms": runs["tome"][0][name], "quickmerge_ms": runs["quickmerge"][0][name],
             "difference_ms": runs["quickmerge"][0][name] - runs["tome"][0][name]} for name in runs["tome"][0]]
    print(f"{'ms per forward':>28} {'ToMe-style':>10} {'QuickMerge++':>12} {'difference':>10}")
    for row in rows:
        print(f"{row['piece']:>28} {row['tome_ms']:10.1f} {row['quickmerge_ms']:12.1f} {row['difference_ms']:+10.1f}")
    operators = {method: ops for method, (_, ops) in runs.items()} if args.operators else None
    for method, ops in (operators or {}).items():
        print(f"{method}: self CPU ms per forward of the {args.operators} costliest operators")
        for name, ms in ops.items():
            print(f"{name:>40} {ms:10.1f}")
    if args.json:
        versions = {"torch": torch.__version__}
        if args.family == "fashion-vit":
            import timm

            versions["timm"] = timm.__version__
        else:
            import transformers

            versions["transformers"] = transformers.__version__
        Path(args.json).write_text(json.dumps({"args": vars(args), "cores": os.cpu_count(), **versions,
                                               "platform": platform.platform(), "rows": rows,
                                               **({"operators": operators} if operators else {})}, indent=2))


if __name__ == "__main__":
    main()
