"""Paired comparison of our methods against the best competitor at each ratio, from an eval JSON.

Usage: python benchmarks/paired_vs_best.py results/text_issue10.json [--out docs/results/issue10/paired.json]
       python benchmarks/paired_vs_best.py RESULTS.json --ours METHOD --against METHOD [METHOD ...] [--out ...]

Several runs of one protocol on disjoint examples (e.g. ``eval text --first``) are pooled first: the methods
and ratios present in every run, their examples concatenated.

"Best competitor" = the kvpress configuration with the lowest perplexity at that ratio in the
same run (same examples). For each of our methods: paired perplexity ratio (ours / best) with
its 95% bootstrap interval, and on how many examples ours has the lower NLL. With ``--ours`` and
``--against``, the same for one method against the named ones (any methods of the run, ours included).
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
        rel, low, high, wins = _paired(ours, best)
        out.append({"ratio": ratio, "method": ours["method"], "best_kvpress": best["method"], "kind": kind,
                    "best_kvpress_memory_saved": best["memory_saved"], "ratio_to_best": rel,
                    "ratio_to_best_ci95": [low, high], "lower_on": wins, "examples": len(best["nll_per_example"])})
    return out


def compare_named(results: dict, ours: str, against: list[str]) -> list[dict]:
    """``ours`` against each method of ``against`` at every ratio where both ran."""
    rows = {(r["method"], r["compression_ratio"]): r for r in results["summary"]}
    missing = [m for m in [ours, *against] if not any(method == m for method, _ in rows)]
    if missing:
        raise SystemExit(f"--ours/--against: not in the results: {', '.join(missing)}")
    out = []
    for ratio in sorted({r for m, r in rows if m == ours and r is not None}):
        for other in (m for m in against if (m, ratio) in rows):
            rel, low, high, wins = _paired(rows[ours, ratio], rows[other, ratio])
            out.append({"ratio": ratio, "method": ours, "against": other, "ratio_to_it": rel,
                        "ratio_to_it_ci95": [low, high], "lower_on": wins,
                        "examples": len(rows[ours, ratio]["nll_per_example"])})
    return out


def _paired(ours: dict, other: dict) -> tuple[float, float, float, int]:
    """Perplexity ratio ours / other on the same examples, its 95% bootstrap interval, and ours' lower-NLL count."""
    a, b = ours["nll_per_example"], other["nll_per_example"]
    rel, low, high = bootstrap_ratio(a, b)
    return rel, low, high, sum(x < y for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="eval JSONs; several: runs on disjoint examples, pooled")
    parser.add_argument("--ours", help="with --against: this method instead of every one of ours")
    parser.add_argument("--against", nargs="+", metavar="METHOD", help="compare with these instead of the best press")
    parser.add_argument("--out")
    args = parser.parse_args()
    if (args.ours is None) != (args.against is None):
        parser.error("--ours and --against go together")
    runs = []
    for path in args.results:
        with open(path) as f:
            runs.append(json.load(f))
    if args.ours:
        rows = compare_named(pool_runs(runs), args.ours, args.against)
        for r in rows:
            low, high = r["ratio_to_it_ci95"]
            print(f"{r['ratio']} {r['method']} / {r['against']}: {r['ratio_to_it']:.4f} [{low:.4f}, {high:.4f}] "
                  f"lower on {r['lower_on']}/{r['examples']}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        return
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
