"""Which observation window for QuickMergePress on the AR image model? Held-out training images, not the test set.

    .venv/bin/python benchmarks/exploration/ar_image_window.py --model results/ar_image
"""
import argparse
import json
import math

import torch

from quickmerge.ar.data import image_pixels
from quickmerge.ar.formats import to_sequences
from quickmerge.eval.text import Method, TextExample, score_example
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.ar_models import load_ar
from quickmerge.text import QuickMergePress

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="image")
ap.add_argument("--examples", type=int, default=40)
ap.add_argument("--out", default="docs/results/issue12/ar_image_window.json")
args = ap.parse_args()
torch.set_num_threads(1)
model, tok, fmt = load_ar(args.model)
ids = to_sequences(image_pixels("heldout")[: args.examples], fmt, tok)
examples = [TextExample(f"heldout-{i}", row) for i, row in enumerate(ids)]
methods = {f"quickmerge-window{w}": Method(f"w{w}", lambda r, w=w: QuickMergePress(compression_ratio=r, window=w),
                                           decode_inside=True) for w in (16, 28, 56, 112)}
methods["kvpress-lagkv"] = build_method("kvpress-lagkv")
base = [score_example(model, e, fmt.context, None, Method("none", lambda r: None))["nll"] for e in examples]
out = {}
for ratio in (0.5, 0.75):
    for name, m in methods.items():
        nll = [score_example(model, e, fmt.context, m.make(ratio), m, ratio)["nll"] for e in examples]
        out[f"{name}@{ratio}"] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
        print(name, ratio, round(out[f"{name}@{ratio}"], 4), flush=True)
from pathlib import Path
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps({"examples": args.examples, "split": "heldout", "ratio_to_uncompressed": out},
                                     indent=2) + "\n")
