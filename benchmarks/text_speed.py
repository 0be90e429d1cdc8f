"""Wall-time ratios and memory of QuickMerge++ on a real causal LM, measured side by side.

Usage:  python benchmarks/text_speed.py [--repeats 5] [--out results/text_speed.json] [--parts ...] [--contexts ...]

On SmolLM2-135M (2 threads), real Wikipedia text:
  1. prefill of C=1024 and C=4096 tokens with no press vs QuickMergePress(0.5): the overhead;
  2. one decode step (one new token) on the full cache vs the 50%-merged cache with and
     without proportional attention, at C=1024, 4096 and 8128 (SmolLM2's 8192 positions
     minus the decoded tokens); median over 32 steps, repeated;
  3. peak resident memory of a process that loads the model and prefills C=4096 tokens,
     with no press vs QuickMergePress(0.5) (each in a fresh subprocess);
  4. prefill of C=2048 tokens with no press vs input-side merging (QuickMergeInputPress(0.5));
  5. prefill of C=1024 tokens with no press vs replay scoring (eval methods quickmerge-replay-pooled and
     quickmerge-replay-proportional), the pooled one's time in replay_attention alongside, and vs kvpress's
     KVzip (eval method kvpress-kvzip, the press the replay recipe is compared against), which reads the
     context again when its press exits: every row times the prompt's forward plus the press's exit, the
     time from the prompt to a compressed cache (kvpress's tokenizer load on entering is not timed).
Methods are interleaved within each repeat; medians are reported with their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from quickmerge.data import wikipedia_articles
from quickmerge.eval.timing import cpu_counters, steal_share
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import QuickMergeInputPress, QuickMergePress
from quickmerge.text.cache import cache_kwargs

DECODE_STEPS = 32
PARTS = ("prefill", "decode", "memory", "input", "replay")


def long_ids(tokenizer, length: int) -> torch.Tensor:
    """``length`` tokens of running Wikipedia text (articles joined when one is too short)."""
    ids: list[int] = []
    for article in sorted(wikipedia_articles(), key=lambda a: -len(a.text)):
        ids += tokenizer(article.text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            return torch.tensor(ids[:length])[None]
    raise ValueError(f"the Wikipedia dump holds fewer than {length} tokens")


@torch.no_grad()
def prefill(model, ids, press) -> tuple[float, DynamicCache, contextlib.ExitStack]:
    cache = DynamicCache()
    stack = contextlib.ExitStack()
    if press is not None:
        stack.enter_context(press(model))
    start = time.perf_counter()
    model.model(input_ids=ids, **cache_kwargs(model.model, cache))
    return time.perf_counter() - start, cache, stack


@torch.no_grad()
def decode_steps(model, cache, tokens: torch.Tensor) -> float:
    """Median seconds of single-token decode steps (positions continue from the cache)."""
    times = []
    for i in range(tokens.shape[1]):
        start = time.perf_counter()
        model(input_ids=tokens[:, i : i + 1], **cache_kwargs(model, cache))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PRESSES = {
    "none": lambda: None,
    "quickmerge": lambda: QuickMergePress(compression_ratio=0.5),
    "quickmerge_no_proportional": lambda: QuickMergePress(compression_ratio=0.5, proportional=False),
}


def peak_memory(context: int, press: str) -> float:
    """Peak RSS (GB) of a fresh process that loads SmolLM2 and prefills ``context`` tokens under ``press``."""
    code = (
        "import sys, torch; sys.path.insert(0, '.'); from benchmarks.text_speed import *\n"
        f"torch.set_num_threads(2); model, tok = load_causal_lm(); ids = long_ids(tok, {context})\n"
        "before = [l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        f"seconds, cache, stack = prefill(model, ids, PRESSES[{press!r}]()); stack.close()\n"
        "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
        "print(before, peak)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-1]) / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/text_speed.json")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which measurements")
    parser.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 8192 - DECODE_STEPS - 32],
                        help="contexts of the decode-step measurement")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tok = load_causal_lm()
    results: dict[str, dict] = {"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__}}
    before = cpu_counters()

    for context in (1024, 4096) if "prefill" in args.parts else ():
        ids = long_ids(tok, context)
        rows = {"none": [], "quickmerge": []}
        for _ in range(args.repeats):
            for name in rows:
                seconds, _, stack = prefill(model, ids, PRESSES[name]())
                stack.close()
                rows[name].append(seconds)
        med = {k: statistics.median(v) for k, v in rows.items()}
        results[f"prefill_{context}"] = {**med, "overhead": med["quickmerge"] / med["none"] - 1}
        print(results[f"prefill_{context}"], flush=True)

    for context in args.contexts if "decode" in args.parts else ():
        full = long_ids(tok, context + DECODE_STEPS)
        ids, cont = full[:, :context], full[:, context:]
        rows = {name: [] for name in PRESSES}
        for _ in range(max(1, args.repeats // 2)):
            for name in PRESSES:
                _, cache, stack = prefill(model, ids, PRESSES[name]())
                with stack:
                    rows[name].append(decode_steps(model, cache, cont))
        med = {k: statistics.median(v) for k, v in rows.items()}
        results[f"decode_step_{context}"] = {
            **med,
            "speedup_merged": med["none"] / med["quickmerge"],
            "speedup_merged_no_proportional": med["none"] / med["quickmerge_no_proportional"],
            "proportional_share_of_step": med["quickmerge"] / med["quickmerge_no_proportional"] - 1,
        }
        print(results[f"decode_step_{context}"], flush=True)

    if "memory" in args.parts:
        results["peak_memory_gb_4096"] = {name: peak_memory(4096, name) for name in ("none", "quickmerge")}
        print(results["peak_memory_gb_4096"], flush=True)

    if "input" in args.parts:
        ids = long_ids(tok, 2048)
        rows = {"none": [], "quickmerge_input": []}
        for _ in range(args.repeats):
            for name, press in [("none", None), ("quickmerge_input", QuickMergeInputPress(compression_ratio=0.5))]:
                seconds, _, stack = prefill(model, ids, press)
                stack.close()
                rows[name].append(seconds)
        med = {k: statistics.median(v) for k, v in rows.items()}
        results["input_mode_prefill_2048"] = {**med, "speedup": med["none"] / med["quickmerge_input"]}

    if "replay" in args.parts:
        from quickmerge.eval.text_methods import build_method, kvpress_available
        from quickmerge.text import replay

        ids = long_ids(tok, 1024)
        scoring = replay.replay_attention
        spent: list[float] = []

        def timed(*a, **k):
            start = time.perf_counter()
            out = scoring(*a, **k)
            spent.append(time.perf_counter() - start)
            return out

        methods = {"replay_pooled": "quickmerge-replay-pooled", "replay_proportional": "quickmerge-replay-proportional"}
        if kvpress_available():
            methods["kvzip"] = "kvpress-kvzip"
        makers = {name: build_method(m).make for name, m in methods.items()}
        rows = {"none": [], **{name: [] for name in makers}, "replay_attention": []}
        replay.replay_attention = timed
        try:
            for _ in range(args.repeats):
                for name in ("none", *makers):
                    spent.clear()
                    press = makers[name](0.5) if name in makers else None
                    seconds, _, stack = prefill(model, ids, press)
                    start = time.perf_counter()
                    with torch.no_grad():  # as the prefill: KVzip compresses here; ours only removes its hooks
                        stack.close()
                    rows[name].append(seconds + time.perf_counter() - start)
                    if name == "replay_pooled":
                        rows["replay_attention"].append(sum(spent))
        finally:
            replay.replay_attention = scoring
        med = {k: statistics.median(v) for k, v in rows.items()}
        results["replay_prefill_1024"] = {**med, **{f"ratio_{name}": med[name] / med["none"] for name in makers}}
        results["replay_prefill_1024"]["seconds_per_repeat"] = rows
        for name in ("replay_pooled", "replay_proportional") if "kvzip" in makers else ():
            results["replay_prefill_1024"][f"{name}_over_kvzip"] = med[name] / med["kvzip"]
        print(results["replay_prefill_1024"], flush=True)

    steal = steal_share(before, cpu_counters())
    if steal is not None:  # over the whole run: how much of the machine its timings had
        results["machine"]["steal_share"] = steal
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
