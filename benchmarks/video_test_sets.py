"""Our video variants against the best kvpress press on every video test set, in one figure.

    python benchmarks/video_test_sets.py \
        --set "held out (40)" docs/results/issue12/video40_paired_vs_best.json \
              docs/results/issue12/video40_replay_prop_paired_vs_best.json \
        --set "tree.avi (17)" docs/results/issue12/video_tree_paired_vs_best.json \
        --set "box.mp4 (113)" docs/results/issue12/video_box_paired_vs_best.json \
        --set "cup.mp4 (54)" docs/results/issue12/video_cup_paired_vs_best.json \
        --set "3 clips pooled (184)" docs/results/issue12/video_independent_paired_vs_best.json \
        --out docs/results/issue12/video_test_sets.json --png docs/img/video_test_sets.png

Reads the outputs of ``benchmarks/paired_vs_best.py``. For each test set, ratio and method the ratio plotted
is the one against the *best press of all* (the lowest perplexity in that run, masking presses included): of a
method's rows at a ratio, the largest ``ratio_to_best`` (the best press of all has the lowest perplexity, so
ours / it is the largest ratio). Below 1 with the interval: ours lower.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

METHODS = {
    "quickmerge-replay-proportional": "replay, proportional (KV press)",
    "quickmerge-frame": "one-frame window (KV press)",
    "quickmerge-input": "input side, after layer 0",
    "quickmerge-input-time": "input side along time, before layer 0",
}


def against_best(rows: list[dict]) -> dict[tuple[float, str], dict]:
    """(ratio, method) -> the row against the best press of all."""
    out: dict[tuple[float, str], dict] = {}
    for row in rows:
        key = (row["ratio"], row["method"])
        if key not in out or row["ratio_to_best"] > out[key]["ratio_to_best"]:
            out[key] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", nargs="+", action="append", required=True, metavar=("LABEL", "JSON"),
                    help="a test set's label and its paired_vs_best JSON(s)")
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.75])
    ap.add_argument("--out", required=True, help="JSON of the plotted values")
    ap.add_argument("--png", required=True)
    args = ap.parse_args()
    for entry in args.set:
        if len(entry) < 2:
            raise SystemExit(f"--set needs a label and at least one JSON, got {entry}")
    points = []
    for label, *paths in args.set:
        rows = [row for path in paths for row in json.loads(Path(path).read_text())]
        best = against_best(rows)
        for ratio in args.ratios:
            for method in METHODS:
                row = best.get((ratio, method))
                if row is not None:
                    points.append({"test_set": label, "ratio": ratio, "method": method, "against": row["best_kvpress"],
                                   "ratio_to_best": row["ratio_to_best"], "ci95": row["ratio_to_best_ci95"],
                                   "lower_on": row["lower_on"], "examples": row["examples"]})
    command = shlex.join(["python", "benchmarks/video_test_sets.py", *sys.argv[1:]])
    Path(args.out).write_text(json.dumps({"command": command, "points": points}, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [entry[0] for entry in args.set]
    fig, axes = plt.subplots(1, len(args.ratios), figsize=(6 * len(args.ratios), 0.9 + 0.55 * len(labels)),
                             sharey=True, squeeze=False)
    for ax, ratio in zip(axes[0], args.ratios, strict=True):
        for k, (method, name) in enumerate(METHODS.items()):
            at = [p for p in points if p["ratio"] == ratio and p["method"] == method]
            y = [labels.index(p["test_set"]) + 0.18 * (k - 1.5) for p in at]
            x = [p["ratio_to_best"] for p in at]
            err = [[p["ratio_to_best"] - p["ci95"][0] for p in at], [p["ci95"][1] - p["ratio_to_best"] for p in at]]
            ax.errorbar(x, y, xerr=err, fmt="o", ms=4, capsize=2, label=name)
        ax.axvline(1.0, color="grey", lw=1)
        ax.set_title(f"compression ratio {ratio}")
        ax.set_xlabel("perplexity / best kvpress press of that run (95% paired CI)")
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        for i, label in enumerate(labels):
            rival = {p["against"] for p in points if p["test_set"] == label and p["ratio"] == ratio}
            ax.annotate(", ".join(sorted(r.removeprefix("kvpress-") for r in rival)), (1.0, i - 0.42),
                        fontsize=7, color="grey", ha="left")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle("QuickMerge++ video variants vs the best kvpress press, per test set (below 1: ours lower)")
    fig.tight_layout()
    fig.savefig(args.png, dpi=110)
    print(f"wrote {args.out} and {args.png}")


if __name__ == "__main__":
    main()
