"""Exploration: what the residual unmerge costs against copying on a ViT-B/16 (random weights; speed only).

    python benchmarks/exploration/residual_unmerge_cost.py            # ~2 min on 2 cores
    python benchmarks/exploration/residual_unmerge_cost.py --pooled   # an average-pooled classifier, r = 8 and 16

timm's ``vit_base_patch16_224`` at 224 x 224, patched at r = 8 (QuickMerge++), ``forward_intermediates`` of blocks
3, 7 and 11 as normed feature maps (a multi-level dense head's read), batch 16: seconds per batch for
``unmerge="copy"`` and ``"residual"``, interleaved over 5 rounds (the median), and the unpatched model's.
``--pooled``: the model's head reset to ``global_pool="avg"`` (the final norm kept before the pool: every token
normed, then averaged) and the whole forward ``model(x)`` timed, at r = 8 and 16.
"""
import argparse
import statistics
import time

import timm
import torch

import quickmerge

parser = argparse.ArgumentParser()
parser.add_argument("--pooled", action="store_true")
pooled = parser.parse_args().pooled
torch.manual_seed(0)
model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
if pooled:
    model.reset_classifier(1000, global_pool="avg")
x = torch.randn(16, 3, 224, 224)


def seconds(settings: dict | None) -> float:
    handle = None if settings is None else quickmerge.patch(model, **settings)
    began = time.perf_counter()
    if pooled:
        model(x)
    else:
        model.forward_intermediates(x, indices=[3, 7, 11], norm=True, intermediates_only=True)
    spent = time.perf_counter() - began
    if handle is not None:
        handle.remove()
    return spent


rs = (8, 16) if pooled else (8,)
settings = {"unpatched": None, **{f"{u} r={r}": dict(r=r, unmerge=u) for r in rs for u in ("copy", "residual")}}
with torch.no_grad():
    seconds(settings["copy r=8"])  # warm-up
    times = {name: [] for name in settings}
    for k in range(5):
        for j in range(len(settings)):
            name = list(settings)[(j + k) % len(settings)]
            times[name].append(seconds(settings[name]))
median = {name: statistics.median(t) for name, t in times.items()}
print(f"threads {torch.get_num_threads()}; median seconds per batch of 16: " +
      ", ".join(f"{n} {s:.3f}" for n, s in median.items()))
base = median["unpatched"]
for r in rs:
    copy, residual = median[f"copy r={r}"], median[f"residual r={r}"]
    print(f"r={r}: speed-up over unpatched: copy {base / copy:.3f}x, residual {base / residual:.3f}x; "
          f"residual / copy time {residual / copy:.3f}")
