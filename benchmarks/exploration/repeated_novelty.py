"""Repeated-passage task, dev windows 24..35 (the eval uses 0..23): QuickMerge++'s key-novelty weight at 0.5.

    .venv/bin/python benchmarks/exploration/repeated_novelty.py --out docs/results/issue10/repeated_novelty_dev.json
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_causal_lm("smollm2-135m")
    examples = repeated_passage_windows(tok, 36)[24:]
    base = [score_example(model, e, 1024, None, Method("none", lambda r: None))["nll"] for e in examples]
    methods = {"kvpress-keydiff": build_method("kvpress-keydiff")}
    for weight in (0.0, 1.0, 3.0, 10.0):
        methods[f"quickmerge-novelty{weight:g}"] = Method(
            f"n{weight}", lambda r, w=weight: QuickMergePress(compression_ratio=r, novelty=w), decode_inside=True)
    out = {"examples": len(examples), "split": "repeated-passage windows 24..35", "ratio": 0.5,
           "uncompressed_perplexity": math.exp(sum(base) / len(base)), "ratio_to_uncompressed": {}}
    for name, m in methods.items():
        nll = [score_example(model, e, 1024, m.make(0.5), m, 0.5)["nll"] for e in examples]
        out["ratio_to_uncompressed"][name] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
        print(name, round(out["ratio_to_uncompressed"][name], 3), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
