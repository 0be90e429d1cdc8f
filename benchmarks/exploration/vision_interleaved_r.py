"""One-off check behind run 4 of vision_hidden_scaled_schedules_plan.md: whole-model forwards at one r, timed
interleaved (rotating order) for the unpatched model, ToMe-style and four QuickMerge++ variants, batch 256, 2 threads.

    .venv/bin/python benchmarks/exploration/vision_interleaved_r.py 98 12    # r, rounds
"""
import torch, time, copy, statistics as st, sys
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
torch.set_num_threads(2)
R = int(sys.argv[1]); rounds = int(sys.argv[2])
images,_ = load_fashion_mnist("test"); b = normalize(images[:256])
cfgs = {"none": None, "tome": dict(method="tome"), "qm": dict(method="quickmerge"),
        "qm_hs": dict(method="quickmerge", similarity="hidden", saliency_rule="scaled"),
        "qm_h": dict(method="quickmerge", similarity="hidden"),
        "qm_s": dict(method="quickmerge", saliency_rule="scaled")}
models = {}
for k, c in cfgs.items():
    m = load_fashion_vit().eval()
    if c is not None: patch(m, r=R, **c)
    models[k] = m
T = {k: [] for k in cfgs}
with torch.inference_mode():
    for m in models.values(): m(b)
    for i in range(rounds):
        order = list(cfgs)[i % len(cfgs):] + list(cfgs)[:i % len(cfgs)]
        for k in order:
            a = time.perf_counter(); models[k](b); T[k].append(time.perf_counter() - a)
base = st.median(T["none"])
for k in cfgs: print(f"{k:6s} median {st.median(T[k])*1e3:7.1f} ms  min {min(T[k])*1e3:7.1f}  speedup(med) {base/st.median(T[k]):.3f} speedup(min) {min(T['none'])/min(T[k]):.3f}")
