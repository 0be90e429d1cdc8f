"""Why a query-agnostic press loses the passkey at 0.75 on Gemma-3-270m: which layer must keep the key, and
which score would rank it there. Development trials only (seed 1; the evaluation uses seed 0).

1. Oracle: replay scoring (``quickmerge-replay``) at ``--ratio``, with the needle's entries forced into the
   kept set of some global-attention layers only; does the answer come back?
2. Rank of the key's digits in each global layer under candidate scores (the share of the context's entries
   scored above them, averaged over the five digits: 0 = kept first, 1 = dropped first): replay (the most
   attention a re-reading query pays an entry), replay without the reads along the re-reading's own diagonal
   (``offdiag-R``: a re-read token's attention to the original tokens within R of its own copy is left out),
   the entry's surprisal in the prefill, and recency (StreamingLLM's order: the share of entries after it).
   For the benchmark's needle (the key stated twice, Landmark attention's format) and for the needle that
   states it once (``needle="once"``).

    .venv/bin/python benchmarks/exploration/passkey_diagnosis.py --trials 16 \
        --out docs/results/issue10/passkey_diagnosis.json
"""
import argparse
import json
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import quickmerge.text.replay as replay_module
from quickmerge.eval import retrieval
from quickmerge.eval.text import NO_COMPRESSION, Method
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.primitives import quantile_rank
from quickmerge.text import QuickMergePress
from quickmerge.text.cache import cache_kwargs
from quickmerge.text.replay import replay_scores

ONCE = retrieval.NEEDLES["once"]
RADII = (1, 2, 4, 8, 16)


@dataclass
class NeedleOracle(QuickMergePress):
    """Replay scoring, except that entries ``span`` rank first in the layers ``forced``."""

    span: tuple[int, int] = (0, 0)
    forced: tuple[int, ...] = ()

    def rescore(self, base, cache, attentions, scores, prompt):
        out = super().rescore(base, cache, attentions, scores, prompt)
        for i in self.forced:
            raw = self._replayed[i]
            raw[..., self.span[0]:self.span[1]] = raw.amax() + 2
            out[i] = quantile_rank(raw)
        return out


def replay_statistics(queries, keys, length, scaling, chunk=256):
    """``[B, 1, length, 1 + len(RADII)]``: replay max, then the max over reads farther than R from the diagonal."""
    b, h, n, _ = queries.shape
    k = keys.float().repeat_interleave(h // keys.shape[1], dim=1)
    positions = torch.arange(length + n)
    best = torch.zeros(1 + len(RADII), b, h, length)
    for start in range(0, n, chunk):
        q = queries[:, :, start:start + chunk].float()
        logits = torch.matmul(q, k.transpose(-1, -2)) * scaling
        own = length + torch.arange(start, start + q.shape[2])
        probs = logits.masked_fill(positions[None] > own[:, None], float("-inf")).softmax(-1)[..., :length]
        dist = (torch.arange(length)[None] - (own - length)[:, None]).abs()  # [c, length]
        best[0] = torch.maximum(best[0], probs.amax(2))
        for j, r in enumerate(RADII):
            best[j + 1] = torch.maximum(best[j + 1], probs.masked_fill(dist <= r, 0).amax(2))
    return best.amax(2).permute(1, 2, 0)[:, None]


def digit_positions(tok, trial, needle_text):
    ids = trial.context.tolist()
    needle = tok(needle_text.format(key=trial.key), add_special_tokens=False)["input_ids"]
    start = next(j for j in range(len(ids)) if ids[j:j + len(needle)] == needle)
    digits = [start + j for j, t in enumerate(needle) if tok.decode([t]).strip().isdigit()][:5]
    return start, start + len(needle), digits


@torch.no_grad()
def candidate_ranks(model, tok, trial, needle_text, layers):
    ids = trial.context[None]
    cache = DynamicCache()
    out = model(input_ids=ids, **cache_kwargs(model, cache))
    length = ids.shape[1]
    surprisal = torch.cat([torch.zeros(1), F.cross_entropy(out.logits[0, :-1].float(), ids[0, 1:], reduction="none")])
    original = replay_module.replay_attention
    replay_module.replay_attention = replay_statistics  # replay_scores then returns these statistics per layer
    try:
        stats = replay_scores(model.model, cache, {i: model.model.layers[i].self_attn for i in layers},
                              {"input_ids": ids}, length)
    finally:
        replay_module.replay_attention = original
    _, _, digits = digit_positions(tok, trial, needle_text)
    names = ["replay"] + [f"offdiag-{r}" for r in RADII]
    ranks = {}
    for i in layers:
        s = stats[i][0, 0]  # [length, S]
        ranks[str(i)] = {name: float(sum((s[:, c] > s[d, c]).float().mean() for d in digits) / len(digits))
                         for c, name in enumerate(names)}
    ranks["surprisal"] = float(sum((surprisal > surprisal[d]).float().mean() for d in digits) / len(digits))
    ranks["recency"] = float(sum((length - 1 - d) / length for d in digits) / len(digits))  # StreamingLLM's order
    return ranks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--oracle-trials", type=int, default=None, help="oracle on the first N answered trials")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm("gemma3-270m")
    layers = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    trials = retrieval.passkey_trials(tok, args.trials, bos=True, seed=args.seed)
    forced_sets = [tuple(layers)] + [(i,) for i in layers]
    method = Method("oracle", lambda r: None, decode_inside=True)
    out = {"model": "gemma3-270m", "seed": args.seed, "ratio": args.ratio, "global_layers": layers,
           "command": "python benchmarks/exploration/passkey_diagnosis.py " + " ".join(sys.argv[1:]),
           "needle": retrieval.NEEDLE, "needle_once": ONCE, "oracle": {}, "ranks": {}, "ranks_once": {}}
    answered = []
    for t, trial in enumerate(trials):
        if not retrieval.answer_passkey(model, tok, trial, None, NO_COMPRESSION)["correct"]:
            continue
        answered.append(t)
        start, end, _ = digit_positions(tok, trial, retrieval.NEEDLE)
        oracle = args.oracle_trials is None or len(answered) <= args.oracle_trials
        for forced in ["none", *forced_sets] if oracle else []:
            name = "none" if forced == "none" else "+".join(map(str, forced))
            press = NeedleOracle(compression_ratio=args.ratio, scoring="replay", budget="replay", head_budgets=True,
                                 proportional=False, span=(start, end), forced=() if forced == "none" else forced)
            ok = retrieval.answer_passkey(model, tok, trial, press, method)["correct"]
            out["oracle"].setdefault(name, []).append(ok)
        out["ranks"][str(t)] = candidate_ranks(model, tok, trial, retrieval.NEEDLE, layers)
        print(t, {k: v[-1] for k, v in out["oracle"].items()} if oracle else "", out["ranks"][str(t)], flush=True)
    out["answered"] = answered
    # the same trials with the key stated once: candidate ranks only (the model may not answer them)
    once = retrieval.passkey_trials(tok, args.trials, bos=True, seed=args.seed, needle="once")
    for t in answered:
        out["ranks_once"][str(t)] = candidate_ranks(model, tok, once[t], ONCE, layers)
        print("once", t, out["ranks_once"][str(t)], flush=True)
    out["oracle_kept"] = {k: f"{sum(v):.0f}/{len(v)}" for k, v in out["oracle"].items()}
    for key in ("ranks", "ranks_once"):
        rows = list(out[key].values())
        mean = {str(i): {n: sum(r[str(i)][n] for r in rows) / len(rows) for n in rows[0][str(i)]} for i in layers}
        for name in ("surprisal", "recency"):
            mean[name] = sum(r[name] for r in rows) / len(rows)
        out[key + "_mean"] = mean
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: out[k] for k in ("oracle_kept", "ranks_mean", "ranks_once_mean")}, indent=1))


if __name__ == "__main__":
    main()
