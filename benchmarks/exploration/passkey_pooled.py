"""Replay scoring with each entry's score spread to its neighbours (a max-pool of width k over positions), so a
kept fact keeps its context whole, as SnapKV's pooling does for window scores. Passkey development trials.
Since stop 25 the library's ``QuickMergePress(replay_pool=k)`` (stop 24 ran an equivalent subclass here).
``--novelty W ...`` adds the press's query-agnostic key-novelty term with each weight (stop 27: pooled replay and
LeverageScore lose the key on different trials); ``--presses`` runs kvpress methods beside them.
``--leverage S ...`` (stop 28) reserves share S of the budget for the keys of highest leverage
(``QuickMergePress(leverage=S)``); ``--leverage-pool W`` (``QuickMergePress(leverage_pool=W)``) max-pools the leverage
first, so the reserve goes to spans of about W entries around the strongest outliers. The replay pass is run once per trial and shared by the settings.

    .venv/bin/python benchmarks/exploration/passkey_pooled.py --needle once --ratio 0.75 --kernels 1 5 9 \
        --out docs/results/issue10/passkey_pooled_dev.json
"""
import argparse
import json
import sys

import torch

from quickmerge.eval.retrieval import answer_passkey, passkey_trials
from quickmerge.eval.text import NO_COMPRESSION, Method
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import QuickMergePress
from quickmerge.text import quickmerge_press as qm_press
from quickmerge.text.replay import replay_scores

replays: list[dict] = []  # the replay scores of the current trial: the same for every setting, computed once


def replay_once(*args, **kwargs):
    if not replays:
        replays.append(replay_scores(*args, **kwargs))
    return {i: s.clone() for i, s in replays[0].items()}  # the press writes into them


qm_press.replay_scores = replay_once


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--needle", choices=("landmark", "once"), default="once")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--kernels", type=int, nargs="+", default=[1, 5, 9])
    ap.add_argument("--novelty", type=float, nargs="+", default=[0.0], help="key-novelty weights (0: off)")
    ap.add_argument("--leverage", type=float, nargs="+", default=[0.0],
                    help="shares of the budget reserved for high-leverage keys (0: off)")
    ap.add_argument("--leverage-pool", type=int, default=1,
                    help="odd width: each key's leverage becomes the largest within it, so the reserve keeps spans "
                         "around the strongest outliers (1: off)")
    ap.add_argument("--presses", nargs="*", default=None,
                    help="eval method names run beside (default: kvpress-streaming-llm, skipped with --answered-from)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--answered-from", default=None,
                    help="an `eval passkey --answered-only` JSON: run on its answered trials (same seed and needle), "
                         "skip the uncompressed pass and StreamingLLM, and pair with that run's rows")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm("gemma3-270m")
    trials = passkey_trials(tok, args.trials, bos=True, seed=args.seed, needle=args.needle)
    inside = Method("pooled", lambda r: None, decode_inside=True)
    presses = [build_method(n) for n in (args.presses if args.presses is not None else
                                         [] if args.answered_from else ["kvpress-streaming-llm"])]
    out = {"command": "python benchmarks/exploration/passkey_pooled.py " + " ".join(sys.argv[1:]), "per_trial": {}}
    if args.answered_from:
        with open(args.answered_from) as f:
            earlier = json.load(f)  # an eval run, or a run of this script
            answered = earlier["answered"] if "answered" in earlier else earlier["answered_only"]["trials_answered"]
    else:
        answered = [i for i, t in enumerate(trials) if answer_passkey(model, tok, t, None, NO_COMPRESSION)["correct"]]
    out["answered"] = answered
    for i in answered:
        torch.manual_seed(i)  # the presses that draw (LeverageScore's sketch) draw the same on a rerun
        kept = {}
        for method in presses:
            kept[method.name] = answer_passkey(model, tok, trials[i], method.make(args.ratio), method)
        replays.clear()
        for k in args.kernels:
            for w in args.novelty:
                for lev in args.leverage:
                    press = QuickMergePress(compression_ratio=args.ratio, scoring="replay", budget="replay",
                                            head_budgets=True, proportional=False, replay_pool=k, novelty=w,
                                            leverage=lev, leverage_pool=args.leverage_pool if lev else 1)
                    name = f"replay pool={k}" + (f" novelty={w:g}" if w else "") + (f" leverage={lev:g}" if lev else "")
                    kept[name] = answer_passkey(model, tok, trials[i], press, inside)
        for name, r in kept.items():
            out["per_trial"].setdefault(name, []).append(r["correct"])
        print(i, {n: r["correct"] for n, r in kept.items()}, flush=True)
    out["kept"] = {n: f"{sum(v):.0f}/{len(v)}" for n, v in out["per_trial"].items()}
    print(out["kept"])
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
