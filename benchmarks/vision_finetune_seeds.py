"""Merge-aware fine-tuning over several seeds: the key paired differences of each
benchmarks/vision_finetune.py report side by side, their mean over seeds and the spread.

    python benchmarks/vision_finetune_seeds.py results/finetune_s0.json results/finetune_s1.json \
        results/finetune_s2.json --out docs/results/issue11/finetune_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

KEY_PAIRS = [
    ("fine-tuned quickmerge + quickmerge", "reference, unpatched"),
    ("fine-tuned quickmerge + quickmerge", "fine-tuned tome + tome"),
    ("fine-tuned tome + tome", "reference, unpatched"),
    ("fine-tuned quickmerge + quickmerge", "fine-tuned without merging + quickmerge"),
    ("fine-tuned tome + tome", "fine-tuned without merging + tome"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="JSON reports of benchmarks/vision_finetune.py, one per seed")
    ap.add_argument("--out", required=True, help="summary JSON")
    args = ap.parse_args()
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    rows = []
    for where in reports[0]["paired"]:
        for a, b in KEY_PAIRS:
            per_seed = []
            for rep in reports:
                match = [p for p in rep["paired"].get(where, []) if p["a"] == a and p["b"] == b]
                per_seed.append(match[0] if match else None)
            if any(p is None for p in per_seed):
                continue
            diffs = [p["difference_pt"] for p in per_seed]
            rows.append({"at": where, "a": a, "b": b, "difference_pt_per_seed": diffs,
                         "intervals_pt_per_seed": [[p["low_pt"], p["high_pt"]] for p in per_seed],
                         "mean_pt": statistics.fmean(diffs), "min_pt": min(diffs), "max_pt": max(diffs)})
    accuracy = {name: [100 * rep["accuracy"][name]["accuracy"] for rep in reports]
                for name in reports[0]["accuracy"] if all(name in rep["accuracy"] for rep in reports)}
    summary = {"reports": args.reports, "rows": rows,
               "accuracy_pct_per_seed": accuracy,
               "accuracy_pct_mean": {k: statistics.fmean(v) for k, v in accuracy.items()}}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    for row in rows:
        seeds = ", ".join(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, (lo, hi)
                          in zip(row["difference_pt_per_seed"], row["intervals_pt_per_seed"], strict=True))
        print(f"{row['at']:>5}  {row['a']} - {row['b']}: mean {row['mean_pt']:+.2f} pt; per seed {seeds}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
