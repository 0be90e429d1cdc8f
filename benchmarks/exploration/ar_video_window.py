"""Which observation window for QuickMergePress on the AR video model? Training-clip windows, not the eval's.

    .venv/bin/python benchmarks/exploration/ar_video_window.py --model results/ar_video
"""
import argparse
import json
import math
from pathlib import Path

import torch

from quickmerge.ar.data import video_clips, video_windows
from quickmerge.ar.formats import to_sequences
from quickmerge.eval.text import Method, TextExample, score_example
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.ar_models import load_ar
from quickmerge.text import QuickMergePress

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="video")
ap.add_argument("--examples", type=int, default=16)
ap.add_argument("--out", default="docs/results/issue12/ar_video_window.json")
args = ap.parse_args()
torch.set_num_threads(1)
model, tok, fmt = load_ar(args.model)
windows, _ = video_windows(video_clips("train", fmt), fmt)
pick = torch.linspace(0, len(windows) - 1, args.examples).round().long()
examples = [TextExample(f"train-{i}", row) for i, row in zip(pick.tolist(), to_sequences(windows[pick], fmt, tok))]
methods = {f"quickmerge-window{w}": Method(f"w{w}", lambda r, w=w: QuickMergePress(compression_ratio=r, window=w),
                                           decode_inside=True) for w in (16, 64, 256)}
methods["kvpress-streaming-llm"] = build_method("kvpress-streaming-llm")
base = [score_example(model, e, fmt.context, None, Method("none", lambda r: None))["nll"] for e in examples]
out = {}
for ratio in (0.5, 0.75):
    for name, m in methods.items():
        nll = [score_example(model, e, fmt.context, m.make(ratio), m, ratio)["nll"] for e in examples]
        out[f"{name}@{ratio}"] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
        print(name, ratio, round(out[f"{name}@{ratio}"], 4), flush=True)
Path(args.out).parent.mkdir(parents=True, exist_ok=True)
Path(args.out).write_text(json.dumps({"examples": args.examples, "split": "training clips", "ratio_to_uncompressed": out},
                                     indent=2) + "\n")
