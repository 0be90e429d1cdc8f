"""Wall-time ratios of QuickMerge++ on a real causal LM, measured side by side in one process.

Usage:  python benchmarks/text_speed.py [--repeats 5] [--out results/text_speed.json]

On SmolLM2-135M (2 threads), real Wikipedia text:
  1. prefill of C=1024 tokens with no press vs QuickMergePress(0.5): the press's overhead;
  2. one decode step (one new token) on the full cache vs the 50%-merged cache, at contexts
     1024 and 4096 (median over 32 steps, repeated);
  3. prefill of C=2048 tokens with no press vs input-side merging (QuickMergeInputPress(0.5)).
Methods are interleaved within each repeat; medians are reported with their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from quickmerge.data import wikipedia_articles
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import QuickMergeInputPress, QuickMergePress


def long_ids(tokenizer, length: int) -> torch.Tensor:
    for article in wikipedia_articles():
        ids = tokenizer(article.text, add_special_tokens=False)["input_ids"]
        if len(ids) >= length + 64:
            return torch.tensor(ids[: length + 64])[None]
    raise ValueError(f"no article holds {length + 64} tokens")


@torch.no_grad()
def prefill(model, ids, press) -> tuple[float, DynamicCache, contextlib.ExitStack]:
    cache = DynamicCache()
    stack = contextlib.ExitStack()
    if press is not None:
        stack.enter_context(press(model))
    start = time.perf_counter()
    model.model(input_ids=ids, past_key_values=cache)
    return time.perf_counter() - start, cache, stack


@torch.no_grad()
def decode_steps(model, cache, first_position: int, tokens: torch.Tensor) -> float:
    """Median seconds of single-token decode steps continuing at ``first_position``."""
    times = []
    for i in range(tokens.shape[1]):
        pos = torch.tensor([[first_position + i]])
        start = time.perf_counter()
        model(input_ids=tokens[:, i : i + 1], past_key_values=cache, position_ids=pos)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/text_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = load_causal_lm()
    results: dict[str, dict] = {}

    ids = long_ids(tok, 1024)[:, :1024]
    rows = {"none": [], "quickmerge": []}
    for _ in range(args.repeats):
        for name, press in [("none", None), ("quickmerge", QuickMergePress(compression_ratio=0.5))]:
            seconds, _, stack = prefill(model, ids, press)
            stack.close()
            rows[name].append(seconds)
    med = {k: statistics.median(v) for k, v in rows.items()}
    results["prefill_overhead_1024"] = {**med, "overhead": med["quickmerge"] / med["none"] - 1}

    for context in (1024, 4096):
        full = long_ids(tok, context)
        ids, cont = full[:, :context], full[:, context : context + 32]
        rows = {"none": [], "quickmerge": []}
        for _ in range(max(1, args.repeats // 2)):
            for name, press in [("none", None), ("quickmerge", QuickMergePress(compression_ratio=0.5))]:
                _, cache, stack = prefill(model, ids, press)
                with stack:
                    rows[name].append(decode_steps(model, cache, context, cont))
        med = {k: statistics.median(v) for k, v in rows.items()}
        results[f"decode_step_{context}"] = {**med, "ratio_merged_to_full": med["quickmerge"] / med["none"]}

    ids = long_ids(tok, 2048)[:, :2048]
    rows = {"none": [], "quickmerge_input": []}
    for _ in range(args.repeats):
        for name, press in [("none", None), ("quickmerge_input", QuickMergeInputPress(compression_ratio=0.5))]:
            seconds, _, stack = prefill(model, ids, press)
            stack.close()
            rows[name].append(seconds)
    med = {k: statistics.median(v) for k, v in rows.items()}
    results["input_mode_prefill_2048"] = {**med, "speedup": med["none"] / med["quickmerge_input"]}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
