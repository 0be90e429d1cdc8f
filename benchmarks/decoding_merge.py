"""Merging while decoding against kvpress's ``DecodingPress``: a long continuation with the cache held to a budget.

SmolLM2-135M (or ``--model gemma3-270m``) reads a short Wikipedia prompt and then the next tokens one per call
(teacher forcing, as a long generation would feed its own tokens); every full-attention layer's cache is brought back
to ``--size`` entries each time decoding has added ``--interval`` more. Scored: the negative log-likelihood of every
continuation token predicted once the cache was first compressed (before it, every method is the uncompressed model),
per window; perplexity, paired ratio to no compression and to the best kvpress press, 95% bootstrap intervals.

Methods: no compression; ``QuickMergePress(0.0, decoding_size=S, decoding_interval=I)`` (the prompt whole, merged
while decoding); kvpress 0.5.5's ``DecodingPress(base, compression_interval=I, target_size=S)`` around each scorer
press that runs there. Resumable: each (method, batch of windows) is journaled in ``--out``'s ``.journal.json``.
On Gemma 3 only the full-attention layers are compressed, by every method: QuickMergePress leaves sliding-window
layers alone, and kvpress's presses get kvpress's own Gemma-3 rule (``global_layers_only``, as ``eval text`` does).

    python benchmarks/decoding_merge.py --out docs/results/stop85/decoding_merge.json \\
        --plot docs/img/decoding_merge.png                       # 32 windows, ~30 min on 2 cores
    python benchmarks/decoding_merge.py --pool RUN1.json RUN2.json --out POOLED.json   # several runs' windows

The product's command for this protocol is ``quickmerge eval decoding`` (quickmerge/eval/decoding.py: several budgets
per run, torch.distributed, the product's journal); this script keeps the commands and journals of the runs published
in stops 85 and 86 (BENCHMARKS.md), on the same scoring code.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from quickmerge.eval.decoding import (
    KVPRESS_SCORERS,
    DecodingBudget,
    continuation_nll,
    make_press,
    method_label,
    plot_decoding_eval,
)
from quickmerge.eval.stats import bootstrap_ppl, bootstrap_ratio
from quickmerge.eval.text import wikipedia_windows
from quickmerge.pretrained.causal_lm import load_causal_lm, needs_bos

MODEL_LABELS = {"smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1, float32)",
                "gemma3-270m": "Gemma-3-270m (GGUF Q4_K_M, float32)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(MODEL_LABELS))
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--first", type=int, default=0, help="index of the first Wikipedia window")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--continuation", type=int, default=640)
    parser.add_argument("--size", type=int, default=192, help="entries a layer is merged back to")
    parser.add_argument("--interval", type=int, default=64, help="decoded tokens between compressions")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--methods", nargs="+",
                        default=["none", "quickmerge", *(f"kvpress-{n}" for n in KVPRESS_SCORERS
                                                         if n != "expected-attention-eps")])
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot", help="PNG of the ratios to no compression (with --out of a finished run: redraws it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-rounds", type=int, default=0,
                        help="instead of scoring: time the methods on the first --batch windows, interleaved, this "
                             "many rounds (quiet machine); writes seconds per decoding call and the ratio to none")
    parser.add_argument("--pool", nargs="+", metavar="RUN_JSON",
                        help="instead of running: pool the windows of these finished runs (the methods they share)")
    args = parser.parse_args()
    if args.pool:
        return pooled(args)
    budget = DecodingBudget(args.prompt, args.size, args.interval)
    if budget.refusal() is not None:
        parser.error(budget.refusal())
    torch.set_num_threads(args.threads)
    config = {k: getattr(args, k) for k in ("model", "windows", "first", "prompt", "continuation", "size",
                                            "interval")}
    starts = range(0, args.windows, args.batch)
    journal_path = Path(args.out).with_suffix(".journal.json")
    journal = json.loads(journal_path.read_text()) if journal_path.exists() else {}
    if journal_config(journal, config) != config and not args.timing_rounds:
        raise SystemExit(f"{journal_path} holds a run with another configuration ({journal['config']}): remove it")
    journal["config"] = config
    if args.timing_rounds or any(f"{m}/{s}" not in journal for m in args.methods for s in starts):
        model, tokenizer = load_causal_lm(args.model)
        model.set_attn_implementation("sdpa")
        windows = wikipedia_windows(tokenizer, args.first + args.windows, context=args.prompt,
                                    continuation=args.continuation, bos=needs_bos(args.model))[args.first:]
        ids = torch.stack([w.ids for w in windows])  # [W, prompt + continuation + 1]
        if args.timing_rounds:
            return timing(model, ids[: args.batch], args)
    for method in args.methods:
        for start in starts:
            key = f"{method}/{start}"
            if key in journal:
                continue
            began = time.perf_counter()
            nll, mean_length = continuation_nll(model, ids[start : start + args.batch], args.prompt,
                                                make_press(method, args.size, args.interval))
            journal[key] = {"nll": nll[:, budget.first_scored :].mean(dim=1).tolist(), "cache": mean_length,
                            "seconds": time.perf_counter() - began}
            journal_path.write_text(json.dumps(journal))
            print(f"{key}: mean NLL {sum(journal[key]['nll']) / len(journal[key]['nll']):.4f}, "
                  f"cache {mean_length:.1f}, {journal[key]['seconds']:.0f} s", flush=True)
    per_method = {m: [x for s in starts for x in journal[f"{m}/{s}"]["nll"]] for m in args.methods}
    cache = {m: sum(journal[f"{m}/{s}"]["cache"] for s in starts) / len(starts) for m in args.methods}
    scored = args.continuation + 1 - budget.first_scored
    config = {**config, "model": MODEL_LABELS[args.model], "scored_tokens_per_window": scored}
    report(summarise(per_method, cache, config), args)


def pooled(args: argparse.Namespace) -> None:
    """The summary over the windows of several finished runs (their journals beside their JSONs), for the methods
    every run has; the runs must share every setting but their windows."""
    journals = [json.loads(Path(run).with_suffix(".journal.json").read_text()) for run in args.pool]
    settings = [{k: v for k, v in journal_config(j).items() if k not in ("windows", "first")} for j in journals]
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"the runs differ in more than their windows: {settings}")
    methods = [m for m in args.methods if all(any(k.startswith(f"{m}/") for k in j) for j in journals)]

    def batches(m: str) -> list[dict]:  # each run's batches of method m, in window order
        return [j[k] for j in journals for k in sorted((k for k in j if k.startswith(f"{m}/")),
                                                        key=lambda k: int(k.split("/")[1]))]

    per_method = {m: [x for batch in batches(m) for x in batch["nll"]] for m in methods}
    cache = {m: sum(batch["cache"] for batch in batches(m)) / len(batches(m)) for m in methods}
    first = DecodingBudget(settings[0]["prompt"], settings[0]["size"], settings[0]["interval"]).first_scored
    config = {**settings[0], "windows": len(per_method[methods[0]]),
              "runs": [{"first": j["config"]["first"], "windows": j["config"]["windows"]} for j in journals],
              "model": MODEL_LABELS[settings[0]["model"]],
              "scored_tokens_per_window": settings[0]["continuation"] + 1 - first}
    report(summarise(per_method, cache, config), args)


def journal_config(journal: dict, default: dict | None = None) -> dict | None:
    """A journal's run configuration (``default`` for a new journal); runs before ``--model`` existed were SmolLM2's."""
    if "config" not in journal:
        return default
    return {"model": "smollm2-135m", **journal["config"]}


def summarise(per_method: dict[str, list[float]], cache: dict[str, float], config: dict) -> dict:
    """Rows (perplexity, paired ratio to no compression, 95% intervals) and QuickMergePress paired against the best
    kvpress press, from each method's per-window mean NLLs (the same windows, in the same order, for every method)."""
    rows = []
    for method, nll in per_method.items():
        ppl = bootstrap_ppl(nll)
        ratio = bootstrap_ratio(nll, per_method["none"]) if "none" in per_method else None
        rows.append({"method": method, "perplexity": ppl[0], "perplexity_ci": ppl[1:],
                     "ratio_to_uncompressed": None if ratio is None else ratio[0],
                     "ratio_to_uncompressed_ci": None if ratio is None else ratio[1:],
                     "mean_cache_entries": cache[method]})
    kvpress_rows = [r for r in rows if r["method"].startswith("kvpress-")]
    best = min(kvpress_rows, key=lambda r: r["perplexity"])["method"] if kvpress_rows else None
    paired = {}
    if best is not None and "quickmerge" in per_method:
        ours = per_method["quickmerge"]

        def against(method: str) -> dict:
            value, low, high = bootstrap_ratio(ours, per_method[method])
            return {"ratio": [value, low, high], "lower_on": sum(a < b for a, b in zip(ours, per_method[method],
                                                                                      strict=True))}

        each = {r["method"]: against(r["method"]) for r in kvpress_rows}
        paired = {"best_kvpress": best, "quickmerge_vs_best": each[best]["ratio"], "lower_on": each[best]["lower_on"],
                  "windows": len(ours), "quickmerge_vs_each": each}
    return {"config": config, "rows": rows, "paired": paired}


def report(result: dict, args: argparse.Namespace) -> None:
    """Write ``result`` to ``--out``, print it, and draw ``--plot``."""
    Path(args.out).write_text(json.dumps(result, indent=1))
    for r in sorted(result["rows"], key=lambda r: r["perplexity"]):
        ratio = r["ratio_to_uncompressed"]
        print(f"{r['method']:28s} ppl {r['perplexity']:.3f} [{r['perplexity_ci'][0]:.3f}, "
              f"{r['perplexity_ci'][1]:.3f}]" + ("" if ratio is None else
              f"  vs none {ratio:.4f} [{r['ratio_to_uncompressed_ci'][0]:.4f}, {r['ratio_to_uncompressed_ci'][1]:.4f}]")
              + f"  cache {r['mean_cache_entries']:.0f}")
    paired = result["paired"]
    if paired:
        print(f"QuickMerge++ / {paired['best_kvpress']}: {paired['quickmerge_vs_best'][0]:.4f} "
              f"[{paired['quickmerge_vs_best'][1]:.4f}, {paired['quickmerge_vs_best'][2]:.4f}], lower on "
              f"{paired['lower_on']}/{paired['windows']}")
        for method, vs in sorted(paired["quickmerge_vs_each"].items(), key=lambda kv: kv[1]["ratio"][0]):
            print(f"  / {method}: {vs['ratio'][0]:.4f} [{vs['ratio'][1]:.4f}, {vs['ratio'][2]:.4f}], lower on "
                  f"{vs['lower_on']}/{paired['windows']}")
    if args.plot:
        plot(result, args.plot)


def timing(model, ids: torch.Tensor, args: argparse.Namespace) -> None:
    """Seconds per decoding call of the batch (the prefill counted in, once) for each method, rounds interleaved."""
    seconds: dict[str, list[float]] = {m: [] for m in args.methods}
    steps = ids.shape[1] - args.prompt - 1
    for round_ in range(args.timing_rounds):
        for method in args.methods:
            press = make_press(method, args.size, args.interval)
            began = time.perf_counter()
            continuation_nll(model, ids, args.prompt, press)
            seconds[method].append((time.perf_counter() - began) / steps)
            print(f"round {round_ + 1}: {method} {seconds[method][-1] * 1e3:.1f} ms per step", flush=True)
    median = {m: sorted(v)[len(v) // 2] for m, v in seconds.items()}
    result = {"config": {k: getattr(args, k) for k in ("prompt", "continuation", "size", "interval", "batch",
                                                       "threads", "timing_rounds")},
              "note": "seconds per decoding call of the whole batch, prefill included once (median over rounds)",
              "rows": [{"method": m, "seconds_per_step": median[m], "all_rounds": seconds[m],
                        "ratio_to_none": median[m] / median["none"] if "none" in median else None}
                       for m in args.methods]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    for row in result["rows"]:
        print(f"{row['method']:28s} {row['seconds_per_step'] * 1e3:.1f} ms per step"
              + ("" if row["ratio_to_none"] is None else f", {row['ratio_to_none']:.3f}x none"))


def plot(result: dict, path: str) -> None:
    """Each method's paired perplexity ratio to no compression with its 95% interval, best at the top
    (``quickmerge eval decoding``'s figure, from this script's summary)."""
    c = result["config"]
    none = next((r["mean_cache_entries"] for r in result["rows"] if r["method"] == "none"), None)
    rows = [{"method": r["method"], "decoding_size": c["size"], "decoding_interval": c["interval"],
             "ratio_to_uncompressed": r["ratio_to_uncompressed"], "ratio_to_uncompressed_ci95":
             r["ratio_to_uncompressed_ci"], "memory_saved": 1 - r["mean_cache_entries"] / none}
            for r in result["rows"]]
    title = (f"{c['model'].split(' (')[0]}, {c['windows']} Wikipedia windows: {c['prompt']}-token prompt, "
             f"{c['continuation']} tokens decoded; full-attention layers merged or evicted")
    plot_decoding_eval({"summary": rows}, path, title, label=method_label)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
