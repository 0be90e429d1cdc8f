"""Prefill speed of the AR video model with the video tokens merged before the first layer.

QuickMergeInputPress(layer=-1, time_period=256): the 3 context frames' token embeddings are
merged along time (a static location becomes one token) before any layer runs, so every
layer prefills fewer tokens. Timed alternately with the plain prefill on the same held-out
windows (medians over rounds), with the continuation's bits per token of both, in one run.

    .venv/bin/python benchmarks/video_input_prefill.py [--model DIR] [--ratios 0.5 0.75] [--device cuda] \
        [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from quickmerge.eval.generative import video_examples
from quickmerge.eval.timing import clock, cpu_counters, steal_share
from quickmerge.pretrained.ar_models import load_ar
from quickmerge.text import QuickMergeInputPress
from quickmerge.text.cache import cache_kwargs


def prefill(model, ids, press):
    cache = DynamicCache()
    with torch.no_grad(), press(model) if press is not None else torch.no_grad():
        start = clock(ids.device)
        model.model(input_ids=ids, **cache_kwargs(model.model, cache))
        return clock(ids.device) - start, cache


def bits(model, example, context, press):
    """Bits per continuation token, the continuation decoded inside the press (its masks)."""
    ids = example.ids[None].to(model.device)
    cache = DynamicCache()
    positions = torch.arange(context, ids.shape[1] - 1, device=ids.device)[None]
    with torch.no_grad(), press(model) if press is not None else torch.no_grad():
        model.model(input_ids=ids[:, :context], **cache_kwargs(model.model, cache))
        logits = model(input_ids=ids[:, context:-1], **cache_kwargs(model, cache), position_ids=positions).logits
    return F.cross_entropy(logits[0].float(), ids[0, context + 1 :]).item() / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="video")
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="docs/results/issue12/video_input_prefill.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tokenizer, fmt = load_ar(args.model)
    model.to(device, getattr(torch, args.dtype))
    examples = video_examples(fmt, tokenizer, args.examples)
    context = fmt.context
    batch = torch.stack([e.ids[:context] for e in examples]).to(device)  # the timed prefill: every window at once
    rows = []
    base_bits = [bits(model, e, context, None) for e in examples]
    for ratio in args.ratios:
        press = QuickMergeInputPress(ratio, layer=-1, time_period=fmt.tokens_per_frame, time_offset=1)
        plain, merged = [], []
        prefill(model, batch, None)
        prefill(model, batch, press)  # warm-up
        before = cpu_counters()
        for _ in range(args.rounds):
            plain.append(prefill(model, batch, None)[0])
            merged.append(prefill(model, batch, press)[0])
        steal = steal_share(before, cpu_counters())
        ours = [bits(model, e, context, press) for e in examples]
        rows.append({"ratio": ratio, "prefill_s_plain": statistics.median(plain),
                     "prefill_s_merged": statistics.median(merged),
                     "speedup": statistics.median(plain) / statistics.median(merged),
                     "bits_per_token_plain": sum(base_bits) / len(base_bits),
                     "bits_per_token_merged": sum(ours) / len(ours), "achieved_ratio": press.achieved_ratio,
                     **({} if steal is None else {"timing_steal_share": steal})})
        print(rows[-1])
    result = {"rows": rows, "examples": [e.title for e in examples], "batch": list(batch.shape),
              "threads": args.threads, "torch": torch.__version__, "dtype": args.dtype,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    from pathlib import Path

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
