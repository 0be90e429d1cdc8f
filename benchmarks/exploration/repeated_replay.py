"""Repeated-passage task, dev windows 24..31 (the eval uses 0..23): QuickMerge++ with replay scoring.

Which part of the replay press matters: the scores (replay vs the observation window), the split over
layers (uniform vs the replay budget and its floor), and what happens to the other entries (merged with
proportional attention, merged without it, or dropped: epsilon ~ 0 with the mass bias), against kvpress's
KVzip (head-wise budgets by masking: no memory saved) and KeyDiff, same windows, same run.

First pass (0.5 only, the six variants without head budgets; the sinks' boost then applied per head and not
to the layer split; stopped for the second):
    .venv/bin/python benchmarks/exploration/repeated_replay.py --out docs/results/issue10/repeated_replay_dev_pass1.json
Second pass (head budgets, the flat layout):
    .venv/bin/python benchmarks/exploration/repeated_replay.py --variants replay-budget replay-heads \
        replay-heads-noprop replay-heads-drop --out docs/results/issue10/repeated_replay_dev_pass2.json
Stop 25 (replay scores pooled over neighbours, 0.5):
    .venv/bin/python benchmarks/exploration/repeated_replay.py --ratios 0.5 --variants replay-heads-noprop \
        replay-heads-noprop-pool5 replay-heads-noprop-pool9 --kvpress kvpress-kvzip \
        --out docs/results/issue10/repeated_pooled_dev.json
"""
import argparse
import json
import math

import torch

from quickmerge.eval.retrieval import repeated_passage_windows
from quickmerge.eval.text import Method, score_example
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import QuickMergePress

VARIANTS = {
    "replay": dict(),
    "replay-budget": dict(budget="replay"),
    "replay-budget-floor0": dict(budget="replay", budget_floor=0.0),
    "replay-budget-noprop": dict(budget="replay", proportional=False),
    "replay-budget-mass": dict(budget="replay", bias="mass"),
    "replay-budget-drop": dict(budget="replay", bias="mass", epsilon=1e-6),
    "replay-heads": dict(budget="replay", head_budgets=True),
    "replay-heads-noprop": dict(budget="replay", head_budgets=True, proportional=False),
    "replay-heads-drop": dict(budget="replay", head_budgets=True, proportional=False, epsilon=1e-6),
    # stop 25: the shipped quickmerge-replay with its scores max-pooled over neighbours (replay_pool)
    "replay-heads-noprop-pool5": dict(budget="replay", head_budgets=True, proportional=False, replay_pool=5),
    "replay-heads-noprop-pool9": dict(budget="replay", head_budgets=True, proportional=False, replay_pool=9),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--first", type=int, default=24)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--kvpress", nargs="*", default=["kvpress-kvzip", "kvpress-keydiff"])
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_causal_lm("smollm2-135m")
    examples = repeated_passage_windows(tok, args.first + args.count)[args.first:]
    base = [score_example(model, e, 1024, None, Method("none", lambda r: None))["nll"] for e in examples]
    methods = {name: build_method(name) for name in args.kvpress}
    for name in args.variants:
        methods[f"quickmerge-{name}"] = Method(name, lambda r, kw=VARIANTS[name]: QuickMergePress(
            compression_ratio=r, scoring="replay", **kw), decode_inside=True)
    out = {"examples": len(examples), "split": f"repeated-passage windows {args.first}..{args.first + args.count - 1}",
           "uncompressed_perplexity": math.exp(sum(base) / len(base)), "variants": {k: str(v) for k, v in
           VARIANTS.items()}, "ratio_to_uncompressed": {}, "per_window_nll": {"none": base}}
    for ratio in args.ratios:
        for name, m in methods.items():
            nll = [score_example(model, e, 1024, m.make(ratio), m, ratio)["nll"] for e in examples]
            key = f"{name}@{ratio}"
            out["per_window_nll"][key] = nll
            out["ratio_to_uncompressed"][key] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
            print(key, round(out["ratio_to_uncompressed"][key], 3), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
