"""QuickMerge++'s logits on the shipped reference ViT, all 10,000 test images, five settings (saved for a
before / after comparison of a numerics-level change).

    python docs/results/stop68/image_predictions.py OUT.pt
"""

import sys

import torch

import quickmerge
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit

torch.set_num_threads(1)
model = load_fashion_vit().eval()
x, y = load_fashion_mnist("test")
out = {}
with torch.inference_mode():
    for name, kw in [("qm8", dict(r=8)), ("qm16", dict(r=16)), ("qm24", dict(r=24)),
                     ("qm40g", dict(r=40, matching="greedy")), ("qm16q", dict(r=16, saliency="queries"))]:
        with quickmerge.patch(model, method="quickmerge", **kw):
            logits = torch.cat([model(normalize(x[i : i + 500])) for i in range(0, len(x), 500)])
        out[name] = logits
        print(name, (logits.argmax(-1) == y).float().mean().item(), flush=True)
torch.save(out, sys.argv[1])
