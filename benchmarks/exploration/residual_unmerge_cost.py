"""Exploration: what the residual unmerge costs against copying on a ViT-B/16 (random weights; speed only).

    python benchmarks/exploration/residual_unmerge_cost.py      # ~2 min on 2 cores

timm's ``vit_base_patch16_224`` at 224 x 224, patched at r = 8 (QuickMerge++), ``forward_intermediates`` of blocks
3, 7 and 11 as normed feature maps (a multi-level dense head's read), batch 16: seconds per batch for
``unmerge="copy"`` and ``"residual"``, interleaved over 5 rounds (the median), and the unpatched model's.
"""
import statistics
import time

import timm
import torch

import quickmerge

torch.manual_seed(0)
model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
x = torch.randn(16, 3, 224, 224)


def seconds(settings: dict | None) -> float:
    handle = None if settings is None else quickmerge.patch(model, **settings)
    began = time.perf_counter()
    model.forward_intermediates(x, indices=[3, 7, 11], norm=True, intermediates_only=True)
    spent = time.perf_counter() - began
    if handle is not None:
        handle.remove()
    return spent


settings = {"unpatched": None, "copy": dict(r=8, unmerge="copy"), "residual": dict(r=8)}
with torch.no_grad():
    seconds(settings["copy"])  # warm-up
    times = {name: [] for name in settings}
    for k in range(5):
        for j in range(len(settings)):
            name = list(settings)[(j + k) % len(settings)]
            times[name].append(seconds(settings[name]))
median = {name: statistics.median(t) for name, t in times.items()}
print(f"threads {torch.get_num_threads()}; median seconds per batch of 16: " +
      ", ".join(f"{n} {s:.3f}" for n, s in median.items()))
base = median["unpatched"]
print(f"speed-up over unpatched: copy {base / median['copy']:.3f}x, residual {base / median['residual']:.3f}x; "
      f"residual / copy time {median['residual'] / median['copy']:.3f}")
