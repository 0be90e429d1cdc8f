"""Diagnosis, repeated-passage dev windows 24..31: how much of KVzip's lead is its head-wise split?

QuickMerge++'s replay scores, entries dropped, with the split over (layer, KV head) pairs taken from
the global top of the replay scores as KVzip does. A rectangular cache cannot hold a different count per
head, so this diagnostic hides the dropped entries with a -inf bias instead of removing them (no memory
saved, like kvpress's KVzip and AdaKV). Compared with the same scores split evenly over heads
(``budget="replay"``, per layer) and with kvpress's KVzip, same windows, same run.

    .venv/bin/python benchmarks/exploration/replay_headwise.py --out docs/results/issue10/replay_headwise_dev.json
"""
import argparse
import json
import math
from dataclasses import dataclass

import torch

from quickmerge.eval.retrieval import repeated_passage_windows
from quickmerge.eval.text import Method, score_example
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import QuickMergePress
from quickmerge.text.kv_press import Compressed


@dataclass
class HeadwiseMask(QuickMergePress):
    """Replay scores, global (layer, head, entry) top-k kept, the rest hidden by a -inf bias."""

    def layer_budgets(self, lengths: dict[int, int]) -> dict[int, int]:
        layers = sorted(lengths)
        raw = torch.stack([self._replayed[i].float() for i in layers])  # [layers, B, Hkv, L]
        raw[..., : self.sinks] = raw.amax() + 1
        total = sum(self.kept(lengths[i]) for i in layers) * raw.shape[2]
        threshold = raw.flatten().topk(total).values[-1]
        self._keep = {i: raw[n] >= threshold for n, i in enumerate(layers)}
        return {i: lengths[i] for i in layers}  # nothing removed: the bias hides

    def merge(self, module, keys, values, scores, kept):
        sizes = self._keep[module.layer_idx].float()  # log(0) = -inf hides the entry
        self._entries_hidden = getattr(self, "_entries_hidden", 0) + int((sizes == 0).sum())
        return Compressed(keys, values, sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_causal_lm("smollm2-135m")
    examples = repeated_passage_windows(tok, 32)[24:]
    base = [score_example(model, e, 1024, None, Method("none", lambda r: None))["nll"] for e in examples]
    methods = {
        "headwise-mask": Method("h", lambda r: HeadwiseMask(compression_ratio=r, scoring="replay", budget="replay"),
                                decode_inside=True, masks=True),
        "layerwise-drop": Method("l", lambda r: QuickMergePress(compression_ratio=r, scoring="replay",
                                 budget="replay", bias="mass", epsilon=1e-6), decode_inside=True),
    }
    out = {"examples": len(examples), "split": "repeated-passage windows 24..31",
           "uncompressed_perplexity": math.exp(sum(base) / len(base)), "ratio_to_uncompressed": {}}
    for ratio in args.ratios:
        for name, m in methods.items():
            nll = [score_example(model, e, 1024, m.make(ratio), m, ratio)["nll"] for e in examples]
            out["ratio_to_uncompressed"][f"{name}@{ratio}"] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
            print(name, ratio, round(out["ratio_to_uncompressed"][f"{name}@{ratio}"], 3), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
