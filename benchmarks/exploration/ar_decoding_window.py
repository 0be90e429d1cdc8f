"""Which observation window for merging while decoding on the AR video model? Never on the evaluated windows.

16 windows spread over the training clips (as ar_window.py), or with --heldout-from F the held-out windows F .. F + 15
(eval decoding evaluates 0 .. 39; 40 .. 79 are for development), BOS + the first frame prefilled, the other 767 tokens
decoded one per call (`quickmerge eval decoding --model video`'s protocol), every layer back to S entries each 64
tokens. Perplexity ratio to the uncompressed model over the tokens predicted from a compressed cache, for
QuickMergePress(decoding_window=w) and kvpress's DecodingPress(StreamingLLM), the best press on held-out windows at S = 385, 513.

    .venv/bin/python benchmarks/exploration/ar_decoding_window.py --out docs/results/stop88/ar_decoding_window.json
    .venv/bin/python benchmarks/exploration/ar_decoding_window.py --heldout-from 40 --examples 40 \
        --out docs/results/stop88/ar_decoding_window_dev.json
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ar_window import examples_for

from quickmerge.eval.decoding import DecodingBudget, continuation_nll, make_press
from quickmerge.eval.generative import video_examples
from quickmerge.pretrained.ar_models import load_ar
from quickmerge.text import QuickMergePress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--sizes", type=int, nargs="+", default=[385, 513])
    ap.add_argument("--windows", type=int, nargs="+", default=[16, 64, 128, 256])
    ap.add_argument("--interval", type=int, default=64)
    ap.add_argument("--heldout-from", type=int, default=None, help="held-out windows from this number (default: "
                    "training-clip windows)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok, fmt = load_ar("video")
    model.set_attn_implementation("sdpa")
    prompt = 1 + fmt.tokens_per_frame
    if args.heldout_from is None:
        examples = examples_for("video", fmt, tok, args.examples)
    else:
        examples = video_examples(fmt, tok, args.heldout_from + args.examples)[args.heldout_from :]
    ids = torch.stack([e.ids for e in examples])
    none, _ = continuation_nll(model, ids, prompt, None)
    rows = []
    for size in args.sizes:
        budget = DecodingBudget(prompt, size, args.interval)
        first = budget.first_scored
        base = none[:, first:].mean(dim=1)
        presses = {f"quickmerge-w{w}": QuickMergePress(0.0, decoding_size=size, decoding_interval=args.interval,
                                                       decoding_window=w) for w in args.windows}
        presses["kvpress-streaming-llm"] = make_press("kvpress-streaming-llm", size, args.interval)
        for name, press in presses.items():
            nll, cache = continuation_nll(model, ids, prompt, press)
            ratio = math.exp(float((nll[:, first:].mean(dim=1) - base).mean()))
            rows.append({"size": size, "method": name, "ratio_to_uncompressed": ratio, "mean_cache_entries": cache})
            print(f"S={size} {name:24s} {ratio:.4f} (cache {cache:.0f})", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": vars(args), "windows": [e.title for e in examples], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
