"""Video at 0.5: keep the last context frame whole and spend the rest of the budget on the tokens that moved.

StreamingLLM keeps the last 1.5 frames at 0.5 and ties every QuickMerge++ variant (BENCHMARKS.md, issue 12). This
asks whether *which* older tokens are kept can beat it: the older tokens that differ most from the same location
one frame later (the moving parts; a static background repeats in the kept last frame anyway). The difference is
measured on each layer's input hidden states ``[B, S, D]`` (at layer 0 the embeddings: an unchanged code gives 0).
Eviction through kvpress's ``ScorerPress`` (same budget per layer and head as StreamingLLM), on the development
windows of ``ar_variants.py`` (never the evaluated ones), paired against StreamingLLM.

    .venv/bin/python benchmarks/exploration/video_motion.py --first 40 --count 48 --ratios 0.5 \
        --out docs/results/issue12/video_motion_dev.json
"""
import argparse
import json
from dataclasses import dataclass

import torch
from kvpress import ScorerPress, StreamingLLMPress

from quickmerge.eval.generative import video_examples
from quickmerge.eval.stats import bootstrap_ratio
from quickmerge.eval.text import Method, score_example
from quickmerge.pretrained.ar_models import load_ar

KEEP = 1e4  # above every motion score: always kept


@dataclass
class MotionPress(ScorerPress):
    """Scores ``[B, H, S]``: BOS and the last ``period`` entries KEEP; an older entry, how far its hidden state is
    from the same location's one frame later (+ ``recent_bonus`` for the frame just before the last)."""

    period: int = 256
    offset: int = 1  # tokens before the first frame (BOS)
    recent_bonus: float = 0.0

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        b, s, _ = hidden_states.shape
        scores = torch.full((b, s), KEEP, dtype=torch.float32, device=hidden_states.device)
        last = s - self.period
        h = hidden_states.float()
        older = torch.arange(self.offset, last, device=h.device)
        moved = (h[:, older] - h[:, older + self.period]).norm(dim=-1)  # [B, S_old]
        scores[:, self.offset:last] = moved + self.recent_bonus * (older >= last - self.period).float()
        return scores[:, None, :].expand(b, keys.shape[1], s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=40)
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, fmt = load_ar("video")
    examples = video_examples(fmt, tok, args.first + args.count)[args.first:]
    period = fmt.tokens_per_frame
    methods = {
        "kvpress-streaming-llm": lambda r: StreamingLLMPress(compression_ratio=r),
        "motion": lambda r: MotionPress(compression_ratio=r, period=period),
        "motion, previous frame first": lambda r: MotionPress(compression_ratio=r, period=period, recent_bonus=1e3),
    }
    none = Method("none", lambda r: None)
    base = [score_example(model, e, fmt.context, None, none)["nll"] for e in examples]
    out = {"command": "python benchmarks/exploration/video_motion.py " + " ".join(
        f"--{k} {v}" if not isinstance(v, list) else f"--{k} " + " ".join(map(str, v))
        for k, v in vars(args).items() if v is not None),
        "examples": [e.title for e in examples], "per_example_nll": {"none": base}, "ratio_to_uncompressed": {},
        "paired_vs_streaming_llm": {}}
    for ratio in args.ratios:
        for name, make in methods.items():
            m = Method(name, make)
            nll = [score_example(model, e, fmt.context, make(ratio), m, ratio)["nll"] for e in examples]
            key = f"{name}@{ratio}"
            out["per_example_nll"][key] = nll
            rel, low, high = bootstrap_ratio(nll, base)
            out["ratio_to_uncompressed"][key] = {"ratio": rel, "ci95": [low, high]}
            line = f"{key:40s} {rel:.4f} [{low:.4f}, {high:.4f}]"
            ref = out["per_example_nll"].get(f"kvpress-streaming-llm@{ratio}")
            if ref is not None and name != "kvpress-streaming-llm":
                rel, low, high = bootstrap_ratio(nll, ref)
                lower = sum(a < b for a, b in zip(nll, ref, strict=True))
                out["paired_vs_streaming_llm"][key] = {"ratio": rel, "ci95": [low, high], "lower_on": lower}
                line += f"  vs StreamingLLM {rel:.4f} [{low:.4f}, {high:.4f}] lower on {lower}/{len(nll)}"
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
