"""What merging saves in BLIP captioning: ``generate`` and the tower alone, patched whole, against unpatched.

    python benchmarks/blip_speed.py [--r 8 16 24] [--batch 4] [--tokens 20] [--rounds 5] [--threads 2] [--json PATH]

``BlipForConditionalGeneration`` at BLIP-base's size (transformers' default ``BlipConfig``: a ViT-B/16 tower at 384
px, 577 tokens, 12 layers; a 12-layer BERT-base decoder cross-attending to the tower's tokens in every layer) with
seeded random weights: no pretrained BLIP can be downloaded here, so this measures speed only, never caption
quality (r fixes the token counts, so the cost does not depend on the weights). The images are scikit-image's photos,
resized to 384 and normalised as BLIP's processor does. Each setting (unpatched, then ToMe-style and QuickMerge++'s
default at each r, the whole model patched: the decoder's cross-attention reads the merged tokens by size) is timed
in rotating rounds, greedy ``generate`` of exactly ``--tokens`` tokens and the tower's forward, each with the
unpatched call timed right after it; speed-ups are medians of the per-round ratios. Steal over the run is recorded.
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

import quickmerge
from quickmerge.cli_types import positive_int
from quickmerge.eval.timing import cpu_counters, steal_share
from quickmerge.vision.visualize import PHOTOS, load_photos

# BLIP's processor: OpenAI CLIP's image statistics
MEAN, STD = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])


def photos(batch: int, size: int) -> torch.Tensor:
    """``[batch, 3, size, size]``: scikit-image's photos (repeated if the batch is larger), normalised."""
    images = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in load_photos(PHOTOS, size)])
    images = images[torch.arange(batch) % len(images)]
    return (images - MEAN[:, None, None]) / STD[:, None, None]


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=positive_int, nargs="+", default=[8, 16, 24])
    ap.add_argument("--batch", type=positive_int, default=4)
    ap.add_argument("--tokens", type=positive_int, default=20)
    ap.add_argument("--rounds", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(transformers.BlipConfig()).eval()
    size = model.config.vision_config.image_size
    x = photos(args.batch, size)

    calls = {"generate": lambda: model.generate(pixel_values=x, max_new_tokens=args.tokens,
                                                min_new_tokens=args.tokens, do_sample=False, num_beams=1),
             "tower": lambda: model.vision_model(pixel_values=x)}

    def seconds(call: str, method: str | None, r: int) -> float:
        handle = quickmerge.patch(model, r=r, method=method) if method else None
        try:
            calls[call]()  # warm-up at these settings
            start = time.perf_counter()
            calls[call]()
            return time.perf_counter() - start
        finally:
            if handle is not None:
                quickmerge.unpatch(model)

    settings = [(m, r) for r in args.r for m in ("tome", "quickmerge")]
    keys = [f"{call}/{m}@{r}" for call in calls for m, r in settings]
    ratios: dict[str, list[float]] = {k: [] for k in keys}
    times: dict[str, list[float]] = {k: [] for k in keys} | {f"{call}/none@0": [] for call in calls}
    jobs = [(call, m, r) for call in calls for m, r in settings]
    before = cpu_counters()
    for k in range(args.rounds):
        for call, method, r in jobs[k % len(jobs):] + jobs[: k % len(jobs)]:
            t, ref = seconds(call, method, r), seconds(call, None, 0)
            times[f"{call}/{method}@{r}"].append(t)
            times[f"{call}/none@0"].append(ref)
            ratios[f"{call}/{method}@{r}"].append(ref / t)
        print(f"round {k + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    steal = steal_share(before, cpu_counters())
    rows = [{"call": key.split("/")[0], "setting": key.split("/")[1], "speedup": statistics.median(v),
             "speedups": v, "median_s": statistics.median(times[key])} for key, v in ratios.items()]
    rows += [{"call": call, "setting": "none@0", "median_s": statistics.median(times[f"{call}/none@0"])}
             for call in calls]
    for row in rows:
        extra = f", {row['speedup']:.2f}x" if "speedup" in row else ""
        print(f"{row['call']:>9} {row['setting']:>15}: {row['median_s']:.3f} s{extra}")
    print(f"steal over the run: {steal}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/blip_speed.py " + " ".join(sys.argv[1:]),
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
                       "torch": torch.__version__, "transformers": transformers.__version__,
                       "weights": "random (seeded), BLIP-base size", "steal_share": steal, "rows": rows,
                       "seconds_per_round": times}, f, indent=1)


if __name__ == "__main__":
    main()
