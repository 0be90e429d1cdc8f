"""In one process, the merged prefill of the video input press along time with the old tie order (topk) and the
new one (lowest position first), alternating 15 rounds (stop 64): does the stable sort cost time? Prints medians in ms.

    .venv/bin/python benchmarks/exploration/tie_order_prefill_ab.py
"""
import statistics
import sys

import torch

sys.path[:0] = ["benchmarks", "benchmarks/exploration"]
from tie_orders import spans_along_time_with  # noqa: E402
from video_input_prefill import prefill  # noqa: E402

import quickmerge.text.input_press as input_press  # noqa: E402
from quickmerge.eval.generative import video_examples  # noqa: E402
from quickmerge.pretrained.ar_models import load_ar  # noqa: E402
from quickmerge.text import QuickMergeInputPress  # noqa: E402

torch.set_num_threads(2)
model, tok, fmt = load_ar("video")
batch = torch.stack([e.ids[: fmt.context] for e in video_examples(fmt, tok, 16)])
for ratio in (0.75, 0.5):
    press = QuickMergeInputPress(ratio, layer=-1, time_period=fmt.tokens_per_frame, time_offset=1)
    times = {"topk": [], "lowest": []}
    for rule in times:  # warm-up
        input_press.spans_along_time = spans_along_time_with(rule)
        prefill(model, batch, press)
    for _ in range(15):
        for rule in times:
            input_press.spans_along_time = spans_along_time_with(rule)
            times[rule].append(prefill(model, batch, press)[0])
    print(ratio, {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()})
