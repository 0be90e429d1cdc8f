"""Paired comparison of our methods against the best competitor at each ratio, from an eval JSON.

Usage: python benchmarks/paired_vs_best.py results/text_issue10.json [--out docs/results/issue10/paired.json]

Several runs of one protocol on disjoint examples (e.g. ``eval text --first``) are pooled first: the methods
and ratios present in every run, their examples concatenated.

"Best competitor" = the kvpress configuration with the lowest perplexity at that ratio in the
same run (same examples). For each of our methods: paired perplexity ratio (ours / best) with
its 95% bootstrap interval, and on how many examples ours has the lower NLL.
"""

from __future__ import annotations

import argparse
import json
import math

from quickmerge.eval.stats import bootstrap_ratio

SAME_PROTOCOL = ("task", "model", "context", "continuation")


def pool_runs(runs: list[dict]) -> dict:
    """One result from runs on disjoint examples: rows of every (method, ratio) that all runs have."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    for run in runs[1:]:
        differ = [k for k in SAME_PROTOCOL if run["config"].get(k) != first["config"].get(k)]
        if differ:
            raise SystemExit(f"the runs differ in {differ}: only runs of one protocol can be pooled")
    titles = [t for run in runs for t in run["examples"]]
    if len(set(titles)) != len(titles):
        raise SystemExit("the runs share examples: pool only runs on disjoint examples")
    keys = [{(r["method"], r["compression_ratio"]): r for r in run["summary"]} for run in runs]
    summary = []
    for key in (k for k in keys[0] if all(k in other for other in keys[1:])):
        parts = [k[key] for k in keys]
        nll = [x for p in parts for x in p["nll_per_example"]]
        counts = [len(p["nll_per_example"]) for p in parts]
        saved = sum(p["memory_saved"] * n for p, n in zip(parts, counts, strict=True)) / sum(counts)
        summary.append({"method": key[0], "compression_ratio": key[1], "perplexity": math.exp(sum(nll) / len(nll)),
                        "memory_saved": saved, "nll_per_example": nll})
    return {"examples": titles, "summary": summary, "config": first["config"]}


def compare(results: dict) -> list[dict]:
    rows = [r for r in results["summary"] if r["compression_ratio"] is not None]
    out = []
    for ratio in sorted({r["compression_ratio"] for r in rows}):
        at = [r for r in rows if r["compression_ratio"] == ratio]
        rivals = [r for r in at if r["method"].startswith("kvpress-")]
        shrinking = [r for r in rivals if r["memory_saved"] >= ratio - 0.01]  # not the masking presses
        bests = {min(rivals, key=lambda r: r["perplexity"])["method"]: "best"}
        if shrinking:  # a run of masking presses only (KVzip alone) has none
            bests.setdefault(min(shrinking, key=lambda r: r["perplexity"])["method"], "best that shrinks the cache")
        for name, kind in bests.items():
            out += _against(at, next(r for r in at if r["method"] == name), ratio, kind)
    return out


def _against(at: list[dict], best: dict, ratio: float, kind: str) -> list[dict]:
    out = []
    for ours in (r for r in at if not r["method"].startswith("kvpress-") and r["method"] != "none"):
        rel, low, high = bootstrap_ratio(ours["nll_per_example"], best["nll_per_example"])
        wins = sum(a < b for a, b in zip(ours["nll_per_example"], best["nll_per_example"], strict=True))
        out.append({"ratio": ratio, "method": ours["method"], "best_kvpress": best["method"], "kind": kind,
                    "best_kvpress_memory_saved": best["memory_saved"], "ratio_to_best": rel,
                    "ratio_to_best_ci95": [low, high], "lower_on": wins, "examples": len(best["nll_per_example"])})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="eval JSONs; several: runs on disjoint examples, pooled")
    parser.add_argument("--out")
    args = parser.parse_args()
    runs = []
    for path in args.results:
        with open(path) as f:
            runs.append(json.load(f))
    rows = compare(pool_runs(runs))
    print("| ratio | ours | against (kvpress) | ours / it [95% CI] | lower on |")
    print("|---|---|---|---|---|")
    for r in rows:
        low, high = r["ratio_to_best_ci95"]
        against = f"{r['best_kvpress']} ({r['kind']})"
        print(f"| {r['ratio']} | {r['method']} | {against} | {r['ratio_to_best']:.4f} [{low:.4f}, {high:.4f}] "
              f"| {r['lower_on']}/{r['examples']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
