"""Another family's ViT adapter against timm's on the same trained model: accuracy, agreement and speed.

    python benchmarks/converted_vit.py [--family torchvision] [--r 16 48] [--images 10000] [--rounds 7] \
        [--threads 2] [--json PATH]

The shipped reference ViT (timm, 90.85% on Fashion-MNIST) converted weight for weight into torchvision's
``VisionTransformer`` (``--family torchvision``, :func:`quickmerge.pretrained.fashion_vit.as_torchvision_vit`) or
Hugging Face's ``ViTForImageClassification`` / ``ViTMSNForImageClassification`` (``hf-vit`` / ``hf-msn``, SDPA,
:func:`~quickmerge.pretrained.fashion_vit.as_hf_vit`). On the test images: top-1 of both, unpatched and patched alike
(QuickMerge++'s default and ToMe-style at each r), the share of images whose merges (every output token's size) and
predictions are the same in both. Then every setting of both families is timed in rotating rounds (batch 256), each
round's speed-up against its own family's unpatched model timed right after it, medians over rounds; torchvision's
adapter projects queries and keys once more per block (``nn.MultiheadAttention`` does not expose them), which this
includes. Steal (``/proc/stat``) over the timing is recorded. (Until stop 78 this was ``torchvision_vit.py``, which
took no ``--family``; its JSON keys are unchanged for torchvision.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from reporting import command_line

import quickmerge
from quickmerge.data import fashion_mnist as fm
from quickmerge.eval.timing import cpu_counters, steal_share
from quickmerge.pretrained.fashion_vit import as_hf_vit, as_torchvision_vit, load_fashion_vit

_METHODS = ("quickmerge", "tome")
# --family -> the converter of the reference ViT into it
CONVERTERS = {"torchvision": as_torchvision_vit,
              "hf-vit": lambda model: as_hf_vit(model, "ViTForImageClassification"),
              "hf-msn": lambda model: as_hf_vit(model, "ViTMSNForImageClassification")}


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``[B, classes]``: timm's and torchvision's models take the images, Hugging Face's ``pixel_values``."""
    return model(pixel_values=x).logits if hasattr(model, "config") else model(x)


def _predict(model: torch.nn.Module, images: torch.Tensor, batch: int, method: str | None, r: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Predictions ``[N]`` and final token sizes ``[N, T]`` (None unpatched) of ``model``, patched if ``method``."""
    handle = quickmerge.patch(model, r=r, method=method) if method else None
    try:
        preds, sizes = [], []
        for i in range(0, len(images), batch):
            preds.append(logits(model, fm.normalize(images[i: i + batch])).argmax(-1))
            if handle is not None:
                sizes.append(handle.sizes)
        return torch.cat(preds), torch.cat(sizes) if sizes else None
    finally:
        if handle is not None:
            quickmerge.unpatch(model)


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=tuple(CONVERTERS), default="torchvision")
    ap.add_argument("--r", type=int, nargs="+", default=[16, 48])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = fm.load_fashion_mnist("test")
    if not 1 <= args.images <= len(images):
        ap.error(f"--images must lie in [1, {len(images)}], got {args.images}")
    images, labels = images[: args.images], labels[: args.images]
    families = {"timm": load_fashion_vit()}
    families[args.family] = CONVERTERS[args.family](families["timm"])

    rows = []
    for method, r in [(None, 0)] + [(m, r) for r in args.r for m in _METHODS]:
        out = {name: _predict(model, images, 500, method, r) for name, model in families.items()}
        (p_timm, s_timm), (p_other, s_other) = out["timm"], out[args.family]
        row = {"method": method or "none", "r": r,
               "timm_accuracy": float((p_timm == labels).float().mean()),
               f"{args.family}_accuracy": float((p_other == labels).float().mean()),
               "same_predictions": float((p_timm == p_other).float().mean()),
               "same_merges": None if s_timm is None else float((s_timm == s_other).all(dim=1).float().mean())}
        rows.append(row)
        print(json.dumps(row), flush=True)

    batch = fm.normalize(images[:256])
    settings = [(f, m, r) for f in families for m, r in [(None, 0)] + [(m, r) for r in args.r for m in _METHODS]]

    def seconds(family: str, method: str | None, r: int) -> float:
        model = families[family]
        handle = quickmerge.patch(model, r=r, method=method) if method else None
        try:
            logits(model, batch)  # warm-up at these settings
            start = time.perf_counter()
            logits(model, batch)
            return time.perf_counter() - start
        finally:
            if handle is not None:
                quickmerge.unpatch(model)

    ratios: dict[str, list[float]] = {f"{f}/{m}@{r}": [] for f, m, r in settings if m}
    times: dict[str, list[float]] = {f"{f}/{m}@{r}": [] for f, m, r in settings}
    before = cpu_counters()
    for k in range(args.rounds):
        patched = [s for s in settings if s[1]]
        for family, method, r in patched[k % len(patched):] + patched[: k % len(patched)]:
            t = seconds(family, method, r)
            ref = seconds(family, None, 0)
            times[f"{family}/{method}@{r}"].append(t)
            times[f"{family}/None@0"].append(ref)
            ratios[f"{family}/{method}@{r}"].append(ref / t)
        print(f"round {k + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    steal = steal_share(before, cpu_counters())
    timing = [{"setting": key, "speedup": statistics.median(v), "median_s": statistics.median(times[key])}
              for key, v in ratios.items()]
    timing += [{"setting": f"{f}/None@0", "median_s": statistics.median(times[f"{f}/None@0"])} for f in families]
    for row in timing:
        print(json.dumps(row))
    if args.json:
        out = {"command": command_line("converted_vit.py", args),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
               "torch": torch.__version__, "accuracy": rows, "timing": timing, "timing_steal_share": steal,
               "speedups_per_round": ratios, "seconds_per_round": times}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
