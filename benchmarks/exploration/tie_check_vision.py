"""Logits of the reference ViT on the first 2,000 test images in float32 and bfloat16, under quickmerge.patch with
the selection settings whose tie order stop 65 fixed (ToMe-style's and QuickMerge++'s bipartite ranking, the greedy
removal, the saliency ranks); written to argv[1] (torch.save) so two checkouts can be compared (PYTHONPATH of each).
"""
import sys

import torch

import quickmerge
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit

torch.set_num_threads(2)
images_all, labels_all = load_fashion_mnist("test")
images, labels = normalize(images_all[:2000]), labels_all[:2000]
settings = {"qm r=16": dict(r=16), "qm r=48": dict(r=48), "tome r=16": dict(r=16, method="tome"),
            "tome r=48": dict(r=48, method="tome"), "greedy ratio=0.5": dict(ratio=0.5, matching="greedy"),
            "hidden scaled r=48": dict(r=48, similarity="hidden", saliency_rule="scaled"),
            "greedy hidden scaled r=64": dict(r=64, matching="greedy", similarity="hidden", saliency_rule="scaled")}
out = {"labels": labels}
for dtype in (torch.float32, torch.bfloat16):
    model = load_fashion_vit().eval().to(dtype)
    x = images.to(dtype)
    with torch.no_grad():
        out[f"{dtype} none"] = torch.cat([model(c) for c in x.split(250)]).float()
        for name, s in settings.items():
            with quickmerge.patch(model, **s):
                out[f"{dtype} {name}"] = torch.cat([model(c) for c in x.split(250)]).float()
    for name in [k for k in out if k.startswith(str(dtype))]:
        acc = (out[name].argmax(-1) == labels).float().mean().item()
        print(f"{name}: top-1 {acc:.4f}", flush=True)
torch.save(out, sys.argv[1])
