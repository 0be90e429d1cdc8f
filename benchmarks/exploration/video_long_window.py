"""AR video at 0.5 / 0.75 on 16 training-clip windows: observation windows of 256-384 tokens, proportional on/off.

    .venv/bin/python benchmarks/exploration/video_long_window.py
"""
import sys, math, torch
from ar_window import examples_for
from quickmerge.eval.text import Method, score_example
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.ar_models import load_ar
from quickmerge.text import QuickMergePress
torch.set_num_threads(1)
model, tok, fmt = load_ar("video")
ex = examples_for("video", fmt, tok, 16)
base = [score_example(model, e, fmt.context, None, Method("none", lambda r: None))["nll"] for e in ex]
def run(name, make, decode_inside=True):
    m = Method(name, make, decode_inside=decode_inside)
    for ratio in (0.5, 0.75):
        nll = [score_example(model, e, fmt.context, m.make(ratio), m, ratio)["nll"] for e in ex]
        print(f"{name}@{ratio}: {math.exp(sum(nll)/len(nll) - sum(base)/len(base)):.4f}", flush=True)
sl = build_method("kvpress-streaming-llm"); run("streaming", sl.make, sl.decode_inside)
for w in (256, 320, 384):
    run(f"w{w}", lambda r, w=w: QuickMergePress(compression_ratio=r, window=w))
    run(f"w{w}-noprop", lambda r, w=w: QuickMergePress(compression_ratio=r, window=w, proportional=False))
