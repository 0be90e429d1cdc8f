"""How proportional attention reaches an ``nn.MultiheadAttention``: a per-head, per-query ``attn_mask`` or a float
``key_padding_mask``, timed on the reference ViT converted to torchvision's class.

    python benchmarks/exploration/mha_mask.py [--r 16 48] [--rounds 7] [--threads 2] [--json PATH] \
        [--model {reference,openclip-vit-b-16}]

``attn_mask``: log(size) expanded to ``[B * heads, N, N]`` (a copy per block: 40M floats at batch 256, 4 heads, 197
tokens; the hook's until stop 77). ``key_padding_mask``: the same bias as ``[B, N]``, which the attention broadcasts
over heads and queries (a float key padding mask is added to the logits; the hook's since this run). The shipped
pre-hook applies either (its ``mask_arguments`` swapped); ``attn_mask+all`` also projects every query and key, as
the hook did before :meth:`~quickmerge.vision.patch.MergeHandle.attention_reads`. The outputs are compared, then
QuickMerge++'s default and ToMe-style at each r are timed with each variant, rotating, each round's time over the
unpatched model's timed right after it, medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import quickmerge
from quickmerge.data import fashion_mnist as fm
from quickmerge.eval.timing import cpu_counters, steal_share
from quickmerge.pretrained.fashion_vit import as_torchvision_vit, load_fashion_vit
from quickmerge.vision.adapters import multihead


def _attn_mask_arguments(bias: torch.Tensor, heads: int, n: int) -> dict[str, torch.Tensor]:
    """The bias ``[B, 1, 1, N]`` as ``attn_mask [B * heads, N, N]`` (the hook's until stop 77)."""
    return {"attn_mask": bias.expand(-1, heads, n, n).reshape(-1, n, n)}


def _key_padding_arguments(bias: torch.Tensor, heads: int, n: int) -> dict[str, torch.Tensor]:
    """The bias ``[B, 1, 1, N]`` as a float ``key_padding_mask [B, N]`` (the hook's since stop 77)."""
    return {"key_padding_mask": bias[:, 0, 0]}


MASKS = {"attn_mask": _attn_mask_arguments, "key_padding_mask": _key_padding_arguments}
# variant: (how the bias is passed, whether every query and key is projected, as before stop 77)
VARIANTS = {"attn_mask": ("attn_mask", False), "key_padding_mask": ("key_padding_mask", False),
            "attn_mask+all": ("attn_mask", True)}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--model", choices=("reference", "openclip-vit-b-16"), default="reference",
                    help="the reference ViT as torchvision's class (batch 256 of test images), or OpenCLIP's ViT-B-16 "
                         "image tower with random weights (8 random 224x224 images)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.model == "reference":
        model = as_torchvision_vit(load_fashion_vit())
        batch = fm.normalize(fm.load_fashion_mnist("test")[0][:256])
    else:
        import open_clip

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16").eval().visual
        batch = torch.randn(8, 3, 224, 224)

    shipped = multihead.mask_arguments

    def run(variant: str, method: str | None, r: int, timed: bool = True) -> tuple[float, torch.Tensor]:
        mask, all_queries = VARIANTS[variant]
        multihead.mask_arguments = MASKS[mask]
        handle = quickmerge.patch(model, r=r, method=method) if method else None
        if handle is not None and all_queries:
            handle.attention_reads = lambda: "all"  # per instance: the whole projection, as before
        try:
            out = model(batch)
            if not timed:
                return 0.0, out
            start = time.perf_counter()
            model(batch)
            return time.perf_counter() - start, out
        finally:
            if handle is not None:
                quickmerge.unpatch(model)
            multihead.mask_arguments = shipped

    settings = [(v, m, r) for r in args.r for m in ("quickmerge", "tome") for v in VARIANTS]
    agreement = {f"{v}/{m}@{r}": float((run("attn_mask", m, r, False)[1] - run(v, m, r, False)[1]).abs().max())
                 for r in args.r for m in ("quickmerge", "tome") for v in VARIANTS if v != "attn_mask"}
    print("largest logit difference from attn_mask:", agreement, flush=True)
    ratios: dict[str, list[float]] = {f"{v}/{m}@{r}": [] for v, m, r in settings}
    before = cpu_counters()
    for k in range(args.rounds):
        for variant, method, r in settings[k % len(settings):] + settings[: k % len(settings)]:
            t = run(variant, method, r)[0]
            ratios[f"{variant}/{method}@{r}"].append(run("attn_mask", None, 0)[0] / t)
        print(f"round {k + 1}/{args.rounds}", file=sys.stderr, flush=True)
    rows = [{"setting": key, "speedup": statistics.median(v), "min": min(v), "max": max(v)}
            for key, v in ratios.items()]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/exploration/mha_mask.py " + " ".join(sys.argv[1:]),
                       "threads": args.threads, "torch": torch.__version__, "max_logit_difference": agreement,
                       "rows": rows, "speedups_per_round": ratios,
                       "timing_steal_share": steal_share(before, cpu_counters())}, f, indent=1)


if __name__ == "__main__":
    main()
