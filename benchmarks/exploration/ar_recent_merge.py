"""Exploration (stop 83): at 0.5 on video, can QuickMergePress keep what StreamingLLM keeps (the most recent
entries) and do better by merging, rather than evicting, the older ones? Training-clip windows only (as
``ar_window.py``); perplexity ratio to the uncompressed model.

    .venv/bin/python benchmarks/exploration/ar_recent_merge.py --out docs/results/stop83/ar_video_recent_merge.json
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ar_window import examples_for  # noqa: E402

from quickmerge.eval.text import Method, score_example  # noqa: E402
from quickmerge.eval.text_methods import build_method  # noqa: E402
from quickmerge.pretrained.ar_models import load_ar  # noqa: E402
from quickmerge.text import QuickMergePress  # noqa: E402

VARIANTS = {  # name -> QuickMergePress settings (the window is the kept count minus `spare`, below)
    "size": {},
    "mass": {"bias": "mass"},
    "no-proportional": {"proportional": False},
    "eps0.001-mass": {"epsilon": 0.001, "bias": "mass"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--spares", type=int, nargs="+", default=[0, 4, 16])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, fmt = load_ar("video")
    examples = examples_for("video", fmt, tok, args.examples)
    length = fmt.context
    kept = int(length * (1 - args.ratio))
    base = [score_example(model, e, fmt.context, None, Method("none", lambda r: None))["nll"] for e in examples]
    rows = {}

    def score(name: str, method: Method) -> None:
        nll = [score_example(model, e, fmt.context, method.make(args.ratio), method, args.ratio)["nll"]
               for e in examples]
        rows[name] = {"ratio_to_uncompressed": math.exp(sum(nll) / len(nll) - sum(base) / len(base)),
                      "per_example_nll_minus_none": [a - b for a, b in zip(nll, base, strict=True)]}
        print(name, round(rows[name]["ratio_to_uncompressed"], 4), flush=True)

    score("kvpress-streaming-llm", build_method("kvpress-streaming-llm"))
    for spare in args.spares:
        for variant, settings in VARIANTS.items():
            window = kept - spare
            score(f"window{window}-{variant}", Method(variant, lambda r, w=window, s=settings: QuickMergePress(
                compression_ratio=r, window=w, **s), decode_inside=True))
    Path(args.out).write_text(json.dumps({"examples": len(examples), "split": "training clips", "context": length,
                                          "kept": kept, "ratio": args.ratio, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
