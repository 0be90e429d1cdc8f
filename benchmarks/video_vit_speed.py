"""Throughput of a Hugging Face video transformer (VideoMAE or ViViT) of base size, random weights, patched by
quickmerge, against the unpatched model.

    python benchmarks/video_vit_speed.py [--family videomae] [--frames 16] [--r 32 64] \
        [--methods quickmerge tome] [--batch 1] [--rounds 8] [--threads 2] [--device cpu] [--json PATH]

Speed only: no pretrained video transformer is obtainable here (ENVIRONMENT.md), and speed does not depend on the
weights. ``VideoMAEForVideoClassification`` with VideoMAE-Base's shape (12 layers, 768 wide, 224 x 224 frames, 16 x 16
patches, tubelets of 2 frames: 1,568 tokens at 16 frames, mean-pooled head) or ``VivitForVideoClassification``
with the same (``tubelet_size=[2, 16, 16]``, a class token). Every setting is timed in the same rounds on the same
random clips, each right before the unpatched model, the order rotating
(``quickmerge.eval.vision.time_settings_together``, the protocol of ``eval vision``); speed-ups are medians of the
rounds' ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from quickmerge.eval.vision import time_settings_together


def build(family: str, frames: int) -> torch.nn.Module:
    import transformers

    if family == "videomae":  # VideoMAEConfig's defaults are VideoMAE-Base's
        config = transformers.VideoMAEConfig(num_frames=frames, num_labels=400, attn_implementation="sdpa")
        return transformers.VideoMAEForVideoClassification(config).eval()
    config = transformers.VivitConfig(num_frames=frames, tubelet_size=[2, 16, 16], num_labels=400,
                                      attn_implementation="sdpa")
    return transformers.VivitForVideoClassification(config).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="videomae", choices=["videomae", "vivit"])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--r", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--methods", nargs="+", default=["quickmerge", "tome"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(args.family, args.frames).to(device)
    config = model.config
    clips = torch.randn(args.batch, args.frames, 3, config.image_size, config.image_size, device=device)
    jobs = [(None, 0, {})] + [(m, r, {}) for r in args.r for m in args.methods]
    with torch.inference_mode():
        rows = time_settings_together(model, jobs, clips, args.rounds)
    out = []
    for (method, r, _), row in zip(jobs, rows, strict=True):
        out.append({"method": method or "none", "r": r, "clips_per_s": row["images_per_s"],
                    "speedup": row["speedup"], "speedup_per_round": row["speedup_per_round"],
                    "unpatched_clips_per_s": row["unpatched_images_per_s"]})
        print(f"{method or 'none':>10} r={r:>3}: {row['images_per_s']:7.3f} clips/s, {row['speedup']:.2f}x "
              f"(unpatched {row['unpatched_images_per_s']:.3f} clips/s)")
    if args.json:
        tubelets = (args.frames // (2 if args.family == "videomae" else config.tubelet_size[0])) * (224 // 16) ** 2
        info = {"args": vars(args), "model": type(model).__name__, "tokens": tubelets + int(args.family == "vivit"),
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                "rows": out}
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
