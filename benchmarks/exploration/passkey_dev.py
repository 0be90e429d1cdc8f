"""Passkey development trials (another seed than the evaluated ones): which QuickMerge++ configuration keeps a key.

Runs the uncompressed model on every trial, then each method and each QuickMergePress variant on the trials it
answers (the evaluation's ``--answered-only`` design), and writes the per-trial outcomes. e.g.
    .venv/bin/python benchmarks/exploration/passkey_dev.py --seed 1 --trials 16 --ratio 0.5 \
        --methods quickmerge-replay kvpress-streaming-llm \
        --variants "scoring='replay',budget='replay',head_budgets=True,proportional=False,epsilon=1e-6" \
        --out logs/passkey_dev.json
A variant is QuickMergePress keyword arguments written out; ``replay_prefix`` may be given as text.
"""
import argparse
import ast
import json

import torch

from quickmerge.eval.retrieval import answer_passkey, passkey_trials
from quickmerge.eval.text import NO_COMPRESSION, Method
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.causal_lm import load_causal_lm, needs_bos
from quickmerge.text import QuickMergePress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--needle", choices=("landmark", "once"), default="landmark")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="*", default=[])
    ap.add_argument("--variants", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model)
    trials = passkey_trials(tok, args.trials, bos=needs_bos(args.model), seed=args.seed, needle=args.needle)
    methods = {name: build_method(name) for name in args.methods}
    for text in args.variants:
        kw = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in text.split(","))}
        if isinstance(kw.get("replay_prefix"), str):
            kw["replay_prefix"] = tuple(tok(kw["replay_prefix"], add_special_tokens=False)["input_ids"])
        methods[text] = Method(text, lambda r, kw=kw: QuickMergePress(compression_ratio=r, **kw), decode_inside=True)
    out = {"model": args.model, "needle": args.needle, "seed": args.seed, "trials": args.trials, "ratio": args.ratio, "per_trial": {}}
    base = [answer_passkey(model, tok, t, None, NO_COMPRESSION)["correct"] for t in trials]
    answered = [i for i, c in enumerate(base) if c]
    out["answered"] = answered
    print(f"uncompressed answers {len(answered)} of {len(trials)}", flush=True)
    for name, m in methods.items():
        kept = [answer_passkey(model, tok, trials[i], m.make(args.ratio), m)["correct"] for i in answered]
        out["per_trial"][name] = kept
        print(f"{name}: {sum(kept):.0f}/{len(kept)}", flush=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
