"""Speed-ups of a timed-together ``eval vision`` run under two estimators, from the run's raw seconds.

    python benchmarks/exploration/pooled_speedup.py results/s75/vision_offshelf_retimed.json \
        --json docs/results/stop75/pooled_speedup.json

``own``: the library's estimator since stop 48, the median over rounds of each setting's own ratio (the unpatched
model's seconds timed right after it / its seconds). ``pooled``: round i's reference is the median over all
settings of the unpatched seconds in that round, and a setting's speed-up the median over rounds of that / its
seconds, so the reference's noise is shared by every setting instead of drawn anew for each. Both feed the same
comparison at ToMe-style's speed-ups (``compare_at_tome_speeds``). Needs rows with ``seconds_per_round`` and
``unpatched_seconds_per_round`` (eval vision since stop 75).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

from quickmerge.eval.vision import compare_at_tome_speeds

COMPARED = (("quickmerge", "tome"), ("quickmerge-entropy", "tome"), ("quickmerge-entropy", "quickmerge"))


def pooled_ratios(rows: list[dict]) -> list[list[float]]:
    """Each row's per-round (round's median unpatched seconds) / (its seconds)."""
    rounds = len(rows[0]["seconds_per_round"])
    pooled = [statistics.median(row["unpatched_seconds_per_round"][i] for row in rows) for i in range(rounds)]
    return [[p / s for p, s in zip(pooled, row["seconds_per_round"], strict=True)] for row in rows]


def relative_iqr(values: list[float]) -> float:
    """Interquartile range over the median: how far a setting's rounds scatter."""
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / q2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result", help="a timed-together eval vision / vision_retime JSON")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rows = json.loads(Path(args.result).read_text())["rows"]
    if any("seconds_per_round" not in row for row in rows):
        raise SystemExit(f"{args.result}: rows without seconds_per_round (timed before stop 75)")
    pooled = pooled_ratios(rows)
    pooled_rows = [row | {"speedup": statistics.median(r), "speedup_per_round": r}
                   for row, r in zip(rows, pooled, strict=True)]
    unpatched = next(row for row in rows if row["method"] == "none")["speedup_per_round"]
    by_key = {(row["method"], json.dumps(row["r"])): row for row in rows}
    images_per_s = {row["r"]: row["images_per_s"] / by_key["tome", json.dumps(row["r"])]["images_per_s"]
                    for row in rows if row["method"] == "quickmerge" and ("tome", json.dumps(row["r"])) in by_key}
    out = {"source": args.result,
           "unpatched_against_itself": {"speedup": statistics.median(unpatched), "rounds_min": min(unpatched),
                                        "rounds_max": max(unpatched)},
           "quickmerge_over_tome_images_per_s_at_equal_r": images_per_s, "estimators": {}}
    print(f"unpatched against itself: {statistics.median(unpatched):.2f}x, rounds {min(unpatched):.2f}-"
          f"{max(unpatched):.2f}x")
    print("QuickMerge++ constant r / ToMe-style images/s at equal r: "
          + ", ".join(f"r = {r}: {v:.3f}" for r, v in images_per_s.items()))
    references = [statistics.median(row["unpatched_seconds_per_round"]) for row in rows]
    print(f"the unpatched reference's median seconds, one per setting: {min(references):.3f}-{max(references):.3f}")
    print("median seconds, QuickMerge++ constant r / ToMe-style at equal r: " + ", ".join(
        f"r = {row['r']}: {statistics.median(row['seconds_per_round']):.3f} / "
        f"{statistics.median(by_key['tome', json.dumps(row['r'])]['seconds_per_round']):.3f}"
        for row in rows if row["method"] == "quickmerge" and ("tome", json.dumps(row["r"])) in by_key))
    for name, table in (("own", rows), ("pooled", pooled_rows)):
        comparisons = {f"{m}_vs_{ref}": compare_at_tome_speeds(table, m, ref) for m, ref in COMPARED}
        scatter = statistics.median(relative_iqr(row["speedup_per_round"]) for row in table)
        tome = [row["speedup"] for row in sorted((r for r in table if r["method"] == "tome"), key=lambda r: r["r"])]
        out["estimators"][name] = {
            "speedups": [{"method": row["method"], "r": row["r"], "accuracy": row["accuracy"],
                          "speedup": row["speedup"]} for row in table],
            "median_relative_iqr_of_rounds": scatter,
            "tome_speedups_rise_with_r": all(a < b for a, b in itertools.pairwise(tome)),
            "comparisons": comparisons}
        print(f"{name}: rounds' relative IQR, median over settings {scatter:.3f}; ToMe-style's speed-ups rise "
              f"with r: {out['estimators'][name]['tome_speedups_rise_with_r']}")
        for key, comparison in comparisons.items():
            diffs = ["-" if c["difference"] is None else f"{100 * c['difference']:+.2f}" for c in comparison]
            speeds = ", ".join(f"{c['speedup']:.2f}x" for c in comparison)
            print(f"  {key:36s} at {speeds}: {' / '.join(diffs)}")
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
