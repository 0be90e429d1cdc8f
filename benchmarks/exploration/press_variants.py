"""Press variants on the first N Wikipedia windows at one ratio (the exploration behind the press defaults).

Usage: python benchmarks/exploration/press_variants.py [N=8] [RATIO=0.5]
The rows quoted in BENCHMARKS.md came from successive edits of this script (the methods dict
was changed between runs) and from intermediate versions of QuickMergePress during
development (before quantile-rank saliency, clustering mode and the current defaults), so
only the final variants below reproduce exactly with the current code.
"""

import math
import statistics
import sys
import time

import torch

torch.set_num_threads(2)

from quickmerge.eval.text import Method, score_example, wikipedia_windows
from quickmerge.text import QuickMergePress
from quickmerge.pretrained.causal_lm import load_causal_lm

model, tok = load_causal_lm()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
ratio = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
exs = wikipedia_windows(tok, n)
ours = lambda **kw: Method("qm", lambda r: QuickMergePress(compression_ratio=r, **kw), decode_inside=True)
kv = lambda cls, **kw: Method(cls.__name__, lambda r: cls(compression_ratio=r, **kw))
methods = {
    "none": None,
    "qm_w16": ours(window=16),
    "qm_w8": ours(window=8),
    "qm_w16_k9": ours(window=16, kernel_size=9),
    "qm_w16_e03": ours(window=16, epsilon=0.03),
    "qm_w16_k9_e03": ours(window=16, kernel_size=9, epsilon=0.03),
    "qm_w16_uni": ours(window=16, salient="uniform"),
    "qm_w16_high": ours(window=16, salient="high_entropy"),
}
res = {k: [] for k in methods}
t0 = time.time()
for ex in exs:
    for name, m in methods.items():
        if m is None:
            r = score_example(model, ex, 1024, None, Method("none", None))
        else:
            r = score_example(model, ex, 1024, m.make(ratio), m)
        res[name].append(r)
print("time", time.time() - t0)
base = [r["nll"] for r in res["none"]]
for name, rs in res.items():
    nll = [r["nll"] for r in rs]
    print(
        f"{name:12s} ppl {math.exp(statistics.mean(nll)):.3f} ratio {math.exp(statistics.mean(a - b for a, b in zip(nll, base))):.4f} prefill {statistics.median(r['prefill_s'] for r in rs):.3f} ach {rs[0]['achieved_ratio']:.3f}"
    )
