"""Throughput of any timm ViT with random weights, patched by quickmerge, against the unpatched model, on any device.

    python benchmarks/vit_speed.py [--model vit_base_patch16_224] [--r 8 16] [--methods quickmerge tome] \
        [--legacy-matching] [--batch 64] [--rounds 10] [--device cuda] [--dtype bfloat16] [--json PATH]

Speed only (random weights; no pretrained ViT can be downloaded here). Every setting is timed in the same rounds on
the same batch of random images, each right before the unpatched model, the order rotating
(``quickmerge.eval.vision.time_settings_together``, the protocol of ``eval vision``); speed-ups are medians of the
rounds' ratios; each row also has the mean tokens entering a block (``handle.mean_tokens``, one untimed forward).
``--legacy-matching`` adds QuickMerge++ with the default before stop 72 (``similarity="keys",
saliency_rule="additive"``) at each r. Eager only: the protocol times deep copies, and a compiled forward would not
follow its copy.
Written after stop 63: on an H200 the 128-wide shipped ViT gained little from merging, and ToMe's GPU gains are reported
for ViT-B and larger; this measures that on the next lent GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from quickmerge.eval.vision import time_settings_together
from quickmerge.vision import patch
from quickmerge.vision.patch import LEGACY_MATCHING


def sequence_length(model: torch.nn.Module) -> int:
    """Tokens entering a timm ViT's first block: its patches and prefix (class, register) tokens."""
    return model.patch_embed.num_patches + model.num_prefix_tokens


@torch.inference_mode()
def mean_tokens(model: torch.nn.Module, batch: torch.Tensor, method: str | None, r: int, options: dict) -> float:
    """Mean tokens entering a block of ``model`` patched by ``(method, r, options)`` (unpatched: its length)."""
    if method is None:
        return float(sequence_length(model))
    with patch(model, r=r, method=method, **options) as handle:
        model(batch)
        return handle.mean_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224", help="a timm architecture name")
    ap.add_argument("--r", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--methods", nargs="+", default=["quickmerge", "tome"])
    ap.add_argument("--legacy-matching", action="store_true",
                    help="add QuickMerge++ with the default before stop 72 (keys, additive)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = timm.create_model(args.model, pretrained=False).eval().to(device, dtype)
    size = model.patch_embed.img_size
    batch = torch.randn(args.batch, 3, *size, device=device, dtype=dtype)
    jobs = [(None, 0, {})] + [(m, r, {}) for r in args.r for m in args.methods]
    if args.legacy_matching:
        jobs += [("quickmerge", r, dict(LEGACY_MATCHING)) for r in args.r]
    rows = time_settings_together(model, jobs, batch, args.rounds)
    out = []
    for (method, r, options), row in zip(jobs, rows, strict=True):
        out.append({"method": method or "none", "r": r, **options, **{k: row[k] for k in ("images_per_s", "speedup")},
                    "unpatched_images_per_s": row["unpatched_images_per_s"],
                    "mean_tokens_per_layer": mean_tokens(model, batch, method, r, options)})
        label = (method or "none") + (" " + " + ".join(map(str, options.values())) if options else "")
        print(f"{label:>25} r={r:>3}: {row['images_per_s']:9.1f} img/s, {row['speedup']:.2f}x "
              f"(unpatched {row['unpatched_images_per_s']:.1f} img/s)")
    if args.json:
        info = {"args": vars(args), "tokens": sequence_length(model),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                "cores": os.cpu_count(), "torch": torch.__version__, "timm": timm.__version__, "rows": out}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
