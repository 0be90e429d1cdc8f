"""Merge-aware fine-tuning over several seeds: the key paired differences of each
benchmarks/vision_finetune.py report side by side, their mean over seeds and the spread.

With ``--pooled`` (every report's per-image hits file present) each mean also gets one paired
95% interval: per image, the difference averaged over the seeds, bootstrapped over the images
(the seeds share the test images, so images are what is resampled).

    python benchmarks/vision_finetune_seeds.py results/finetune_s0.json results/finetune_s1.json \
        results/finetune_s2.json --out docs/results/issue11/finetune_seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from quickmerge.eval.stats import bootstrap_difference

try:  # imported from the repository root (tests), or run as a script from benchmarks/
    from benchmarks.vision_finetune import report_hits
except ModuleNotFoundError:
    from vision_finetune import report_hits


def pooled_difference(per_seed: list[dict[str, list[float]]], a: str, b: str) -> tuple[float, float, float]:
    """Seed-averaged paired difference ``a - b`` in points, 95% interval bootstrapped over images.

    ``per_seed``: one ``{curve name: per-image hits}`` per seed, all over the same images.
    """
    def seed_mean(name: str) -> list[float]:
        return [statistics.fmean(v) for v in zip(*(hits[name] for hits in per_seed), strict=True)]

    return tuple(100 * x for x in bootstrap_difference(seed_mean(a), seed_mean(b)))


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
    ap.add_argument("--pooled", action="store_true", help="also one interval per mean, from the per-image hits")
    args = ap.parse_args()
    reports = [json.loads(Path(p).read_text()) for p in args.reports]
    hits = [report_hits(rep) for rep in reports] if args.pooled else None
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
            if hits is not None:
                rows[-1]["pooled_pt"] = pooled_difference([h[where] for h in hits], a, b)
    accuracy = {name: [100 * rep["accuracy"][name]["accuracy"] for rep in reports]
                for name in reports[0]["accuracy"] if all(name in rep["accuracy"] for rep in reports)}
    summary = {"reports": args.reports, "rows": rows,
               "accuracy_pct_per_seed": accuracy,
               "accuracy_pct_mean": {k: statistics.fmean(v) for k, v in accuracy.items()}}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    for row in rows:
        seeds = ", ".join(f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" for d, (lo, hi)
                          in zip(row["difference_pt_per_seed"], row["intervals_pt_per_seed"], strict=True))
        pooled = " [{1:+.2f}, {2:+.2f}]".format(*row["pooled_pt"]) if "pooled_pt" in row else ""
        print(f"{row['at']:>5}  {row['a']} - {row['b']}: mean {row['mean_pt']:+.2f} pt{pooled}; per seed {seeds}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
