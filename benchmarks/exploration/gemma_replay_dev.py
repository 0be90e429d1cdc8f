"""Wikipedia dev windows outside the evaluated ones: which press configuration to evaluate (Gemma-3-270m, SmolLM2).

QuickMerge++'s configurations (window-scored default, replay scoring with layer / head budgets, proportional
attention on and off) against the kvpress presses that led the 20-window run of issue 3 (ObservedAttention,
SnapKV, TOVA) and KVzip, same windows, same run. Gemma 3 has one KV head and compresses only its global
layers (kvpress's rule, applied by the harness to every method).

Each run's command is recorded in the merged JSON, docs/results/issue10/gemma_dev.json (windows 40..45), e.g.
    .venv/bin/python benchmarks/exploration/gemma_replay_dev.py --threads 1 --ratios 0.75 0.5 \
        --methods kvpress-tova kvpress-observed-attention kvpress-snapkv \
        --variants "window=2,kernel_size=1,salient='uniform',proportional=False,epsilon=1e-6" --out logs/gemma_dev7.json

SmolLM2 at 0.75 (dev windows 100.., the eval uses 0..99): variants of the replay configuration against KVzip:
    .venv/bin/python benchmarks/exploration/gemma_replay_dev.py --model smollm2-135m --first 100 --ratios 0.75 \
        --methods quickmerge-replay quickmerge-replay-proportional kvpress-kvzip \
        --variants replay-heads-prefix replay-heads-floor0.05 --out logs/smollm2_replay_dev.json
(merged with the 0.5 run into docs/results/issue10/smollm2_replay_dev.json)
"""
import argparse
import ast
import json
import math

import torch

from quickmerge.eval.text import Method, score_example, wikipedia_windows
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.causal_lm import load_causal_lm, needs_bos
from quickmerge.text import QuickMergePress

VARIANTS = {  # QuickMergePress keyword arguments, on top of the ratio
    "replay-uniform": dict(scoring="replay"),
    "replay-uniform-noprop": dict(scoring="replay", proportional=False),
    "replay-budget": dict(scoring="replay", budget="replay"),
    "default-noprop": dict(proportional=False),
    "replay-heads-floor0.05": dict(scoring="replay", budget="replay", head_budgets=True, proportional=False,
                                   budget_floor=0.05),
    "replay-heads-prefix": dict(scoring="replay", budget="replay", head_budgets=True, proportional=False,
                                replay_prefix="\n\nRepeat the previous context exactly.\n"),  # KVzip's wording
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--out", default=None)
    ap.add_argument("--first", type=int, default=40)
    ap.add_argument("--count", type=int, default=6)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=[
        "quickmerge", "quickmerge-replay", "quickmerge-replay-proportional", "quickmerge-replay-drop",
        "kvpress-observed-attention", "kvpress-snapkv", "kvpress-tova"])
    ap.add_argument("--variants", nargs="*", default=[])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model)
    examples = wikipedia_windows(tok, args.first + args.count, bos=needs_bos(args.model))[args.first:]
    base = [score_example(model, e, 1024, None, Method("none", lambda r: None))["nll"] for e in examples]
    methods = {name: build_method(name) for name in args.methods}
    for name in args.variants:
        # a variant is a name of VARIANTS or keyword arguments written out: "window=4,proportional=False"
        kw = dict(VARIANTS[name]) if name in VARIANTS else {
            k: ast.literal_eval(v) for k, v in (item.split("=") for item in name.split(","))}
        if isinstance(kw.get("replay_prefix"), str):
            kw["replay_prefix"] = tuple(tok(kw["replay_prefix"], add_special_tokens=False)["input_ids"])
        methods[f"quickmerge-{name}"] = Method(name, lambda r, kw=kw: QuickMergePress(
            compression_ratio=r, **kw), decode_inside=True)
    out = {"model": args.model, "examples": len(examples),
           "split": f"Wikipedia windows {args.first}..{args.first + len(examples) - 1}",
           "uncompressed_perplexity": math.exp(sum(base) / len(base)), "ratio_to_uncompressed": {},
           "per_window_nll": {"none": base}}
    for ratio in args.ratios:
        for name, m in methods.items():
            nll = [score_example(model, e, 1024, m.make(ratio), m, ratio)["nll"] for e in examples]
            key = f"{name}@{ratio}"
            out["per_window_nll"][key] = nll
            out["ratio_to_uncompressed"][key] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
            print(key, round(out["ratio_to_uncompressed"][key], 4), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
