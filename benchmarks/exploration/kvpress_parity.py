"""Does our harness run kvpress's presses exactly as kvpress's own pipeline does?

For the first N windows of `quickmerge eval text` (SmolLM2-135M, C=1024, T=64) and a kvpress
press at a ratio: (a) our harness's prefill (`quickmerge.eval.text.score_example`'s code
path), (b) kvpress's `kv-press-text-generation` pipeline `_forward` on the same token ids
(its prefill, then one greedy answer token, then its own rollback of the answer). Compares
the two caches entry by entry and the continuation NLL scored on each.

Usage: python benchmarks/exploration/kvpress_parity.py [N] [--out docs/results/issue10/kvpress_parity.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import transformers
from transformers import DynamicCache

from quickmerge.eval.text import wikipedia_windows
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.causal_lm import load_causal_lm


@torch.no_grad()
def nll(model, cache, cont, target, context):
    positions = torch.arange(context, context + cont.shape[1])[None]
    logits = model(input_ids=cont, past_key_values=cache, position_ids=positions).logits
    return float(torch.nn.functional.cross_entropy(logits[0], target[0]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=3)
    parser.add_argument("--methods", nargs="+", default=["kvpress-expected-attention", "kvpress-snapkv"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default="docs/results/issue10/kvpress_parity.json")
    args = parser.parse_args()
    import kvpress  # noqa: F401  (registers the pipeline)

    torch.set_num_threads(2)
    model, tokenizer = load_causal_lm()
    pipe = transformers.pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    rows = []
    for example in wikipedia_windows(tokenizer, args.n):
        ids = example.ids[None]
        ctx, cont, target = ids[:, :1024], ids[:, 1024:-1], ids[:, 1025:]
        for name in args.methods:
            method = build_method(name)
            ours = DynamicCache()
            with torch.no_grad(), method.make(args.ratio)(model):
                model.model(input_ids=ctx, past_key_values=ours)
            theirs = DynamicCache()
            pipe._forward({"context_ids": ctx, "questions_ids": [cont[:, :1]]}, press=method.make(args.ratio),
                          cache=theirs, max_new_tokens=1)
            diff = max(max((a.keys - b.keys).abs().max().item(), (a.values - b.values).abs().max().item())
                       for a, b in zip(ours.layers, theirs.layers, strict=True))
            rows.append({"example": example.title, "method": name, "ratio": args.ratio,
                         "kept": ours.layers[0].keys.shape[2], "kept_pipeline": theirs.layers[0].keys.shape[2],
                         "max_abs_cache_difference": diff,
                         "nll_ours": nll(model, ours, cont, target, 1024),
                         "nll_pipeline_cache": nll(model, theirs, cont, target, 1024)})
            print(rows[-1], flush=True)
    with open(args.out, "w") as f:
        json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
