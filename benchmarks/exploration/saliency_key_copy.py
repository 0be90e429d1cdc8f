"""Exploration (stop 83): does QuickMerge++'s saliency pay for ``keys.contiguous()`` in ``MergeHandle.merge``?

    python benchmarks/exploration/saliency_key_copy.py --json results/s83/saliency_key_copy.json

Run it on a tree whose ``merge`` passes ``st.k`` uncopied (as stop 83 did, in a scratch worktree): it records the
queries and keys the saliency receives in one forward of the reference ViT (timm; 256 test images,
r = 48), then times, interleaved, the saliency on the keys as captured (the strided view of timm's qkv when run on a
tree without the copy) against copy + saliency, at the first block. Also whether the two give identical values.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import time

import torch

import quickmerge
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    patch_module = importlib.import_module("quickmerge.vision.patch")
    original, calls = patch_module.attention_saliency, []

    def record(q, k, *rest, **kw):
        calls.append((q, k, rest, kw))
        return original(q, k, *rest, **kw)

    model = load_fashion_vit().eval()
    x = normalize(load_fashion_mnist("test")[0][:256])
    patch_module.attention_saliency = record
    try:
        with torch.inference_mode(), quickmerge.patch(model, r=48):
            model(x)
    finally:
        patch_module.attention_saliency = original
    q, k, rest, kw = calls[0]
    cases = {"as_captured": lambda: original(q, k, *rest, **kw),
             "copy_then_saliency": lambda: original(q, k.contiguous(), *rest, **kw),
             "copy_alone": lambda: k.contiguous()}
    times = {c: [] for c in cases}
    with torch.inference_mode():
        for i in range(args.repeats + 5):
            for c, f in cases.items():
                start = time.perf_counter()
                f()
                if i >= 5:
                    times[c].append(time.perf_counter() - start)
        identical = [torch.equal(original(q, k, *rest, **kw), original(q, k.contiguous(), *rest, **kw))
                     for q, k, rest, kw in calls]
    out = {"command": "benchmarks/exploration/saliency_key_copy.py", "args": vars(args),
           "keys_contiguous_as_captured": k.is_contiguous(), "keys_stride": list(k.stride()),
           "median_ms": {c: 1e3 * statistics.median(v) for c, v in times.items()},
           "identical_per_block": identical, "torch": torch.__version__}
    print(json.dumps(out, indent=1))
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
