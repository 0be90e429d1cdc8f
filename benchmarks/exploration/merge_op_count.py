"""Top-level aten calls of one merge step (the reference ViT's first block, r = 16, 64 random images), per method:
a proxy for the kernel launches that dominate the step on a GPU (stop 63).

    .venv/bin/python benchmarks/exploration/merge_op_count.py
"""
import torch, copy, collections
from torch.profiler import profile, ProfilerActivity
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
model = load_fashion_vit()
x0 = torch.randn(64, 1, 28, 28)
with torch.inference_mode():
    x = model.norm_pre(model._pos_embed(model.patch_embed(x0)))
    for method in ("quickmerge", "tome"):
        handle = patch(model, r=16, method=method)
        blk = model.blocks[0]
        handle.begin(x)
        residual = x + blk.ls1(blk.attn(blk.norm1(x)))
        q, k, scale = handle._pass.q, handle._pass.k, handle._pass.scale
        handle.begin(x); handle.record_qk(q, k, scale)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = handle.merge(0, residual)
        ops = [e for e in prof.events() if e.name.startswith("aten::")]
        # top-level aten ops only
        top = [e for e in ops if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
        c = collections.Counter(e.name for e in top)
        print(method, "top-level aten ops:", len(top))
        print(c.most_common(40))
        handle.remove()
