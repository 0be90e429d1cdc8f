"""Single-token decode step: full cache vs 50%-merged cache with and without proportional attention.

Usage: python benchmarks/exploration/decode_breakdown.py   (run from the repository root)
"""

import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")  # text_speed helpers
from text_speed import decode_steps, long_ids, prefill

from quickmerge.text import QuickMergePress
from quickmerge.pretrained.causal_lm import load_causal_lm

torch.set_num_threads(2)
model, tok = load_causal_lm()
out = {}
for context in (1024, 4096):
    full = long_ids(tok, context)
    ids, cont = full[:, :context], full[:, context : context + 32]
    rows = {"none": [], "prop": [], "noprop": []}
    for _ in range(3):
        for name, press in [
            ("none", None),
            ("prop", QuickMergePress(0.5)),
            ("noprop", QuickMergePress(0.5, proportional=False)),
        ]:
            _, cache, stack = prefill(model, ids, press)
            with stack:
                rows[name].append(decode_steps(model, cache, context, cont))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        context,
        {k: round(v * 1000, 2) for k, v in med.items()},
        "prop/none",
        round(med["prop"] / med["none"], 3),
        "noprop/none",
        round(med["noprop"] / med["none"], 3),
    )
