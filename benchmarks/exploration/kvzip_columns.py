"""Which timing column holds kvpress's KVzip's second pass over the prompt: window 0 of the Wikipedia protocol.

    PYTHONPATH=. .venv/bin/python benchmarks/exploration/kvzip_columns.py

Prints the NLL, prefill and decode seconds of KVzip and SnapKV at ratio 0.5 as ``quickmerge eval text`` scores
them (SmolLM2-135M, 2 threads). Run on a checkout before and after the harness timed a press's exit as prefill
(stop 34) to see where the pass went: before, in neither column.
"""

import torch

from quickmerge.eval.text import score_example, wikipedia_windows
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.causal_lm import load_causal_lm

torch.set_num_threads(2)
model, tokenizer = load_causal_lm()
example = wikipedia_windows(tokenizer, 1)[0]
for name in ("kvpress-kvzip", "kvpress-snapkv"):
    method = build_method(name)
    row = score_example(model, example, 1024, method.make(0.5), method)
    print(name, {k: round(v, 3) for k, v in row.items() if k in ("nll", "prefill_s", "decode_s")})
