"""Exploration (stop 83): at 0.5 on video, the input-side press with the most recent W prompt tokens kept whole
(links touching them cut first) and the older frames merged into contiguous spans among themselves, after layer 0.
Unlike merging the older entries into the recent ones (``ar_recent_merge.py``), the recent frame stays unblurred.
Training-clip windows only (as ``ar_window.py``); perplexity ratio to the uncompressed model.

    .venv/bin/python benchmarks/exploration/ar_input_recent.py --out docs/results/stop83/ar_video_input_recent.json
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ar_window import examples_for  # noqa: E402

from quickmerge.eval.generative_cli import INPUT_LAYER  # noqa: E402
from quickmerge.eval.text import Method, score_example  # noqa: E402
from quickmerge.eval.text_methods import build_method  # noqa: E402
from quickmerge.merging import contiguous_spans  # noqa: E402
from quickmerge.pretrained.ar_models import load_ar  # noqa: E402
from quickmerge.text import QuickMergeInputPress  # noqa: E402


class RecentInputPress(QuickMergeInputPress):
    """The input press whose last ``recent`` prompt tokens stay whole (as far as the budget allows)."""

    def __init__(self, *args, recent: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.recent = recent

    def _spans(self, hidden, saliency, kept):
        n = hidden.shape[1]
        cut = torch.arange(n - 1, device=hidden.device) >= n - 1 - self.recent  # links touching the tail
        return contiguous_spans(hidden, saliency, kept, self.saliency_weight, cut_first=cut)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--recent", type=int, nargs="+", default=[0, 256, 320, 368])
    ap.add_argument("--layers", type=int, nargs="+", default=[INPUT_LAYER])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok, fmt = load_ar("video")
    examples = examples_for("video", fmt, tok, args.examples)
    base = [score_example(model, e, fmt.context, None, Method("none", lambda r: None))["nll"] for e in examples]
    rows = {}

    def score(name: str, method: Method) -> None:
        nll = [score_example(model, e, fmt.context, method.make(args.ratio), method, args.ratio)["nll"]
               for e in examples]
        rows[name] = {"ratio_to_uncompressed": math.exp(sum(nll) / len(nll) - sum(base) / len(base)),
                      "per_example_nll_minus_none": [a - b for a, b in zip(nll, base, strict=True)]}
        print(name, round(rows[name]["ratio_to_uncompressed"], 4), flush=True)

    score("kvpress-streaming-llm", build_method("kvpress-streaming-llm"))
    for layer in args.layers:
        for recent in args.recent:
            score(f"input-layer{layer}-recent{recent}", Method(f"r{recent}", lambda r, w=recent, lay=layer: (
                RecentInputPress(compression_ratio=r, layer=lay, recent=w)), decode_inside=True))
    Path(args.out).write_text(json.dumps({"examples": len(examples), "split": "training clips", "ratio": args.ratio,
                                          "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
