"""Accuracy vs speed-up over the whole range: the default grid (within ToMe's cap) and the schedules past it.

    python benchmarks/exploration/vision_high_plot.py   # -> docs/img/vision_past_tome_cap.png

Reads ``docs/results/issue11/vision_full_ref90_s32.json`` (the default grid, stop 32), ``vision_r72_r98.json``
(ToMe-style's upper range, stop 37, continuing the grid's curves), ``vision_high_test.json`` (accuracy past the cap),
``vision_high_test_s65.json`` (the two QuickMerge++ greedy schedules rerun at stop 65, when a block asked to remove
more than the mutual-pair rule allows began removing the held tokens by their own scores; their accuracies replace
stop 36's) and ``vision_high_speed.json`` (every schedule's speed-up, timed together: the rerun changed which tokens
a block removes, not how many). Speed-ups are each run's own ratios to the unpatched model timed in the same run.
"""

import json
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = "docs/results/issue11/"


def main():
    grid = json.load(open(RESULTS + "vision_full_ref90_s32.json"))["rows"]
    grid += [row for row in json.load(open(RESULTS + "vision_r72_r98.json"))["rows"] if row["method"] != "none"]
    test = json.load(open(RESULTS + "vision_high_test.json"))["rows"]
    rerun = {(row["setting"], row["r"]): row["accuracy"]
             for row in json.load(open(RESULTS + "vision_high_test_s65.json"))["rows"] if "accuracy" in row and "r" in row}
    speed = {row["schedule"]: row["speedup"] for row in json.load(open(RESULTS + "vision_high_speed.json"))["rows"]}
    curves = defaultdict(list)
    for row in grid:
        if row["method"] in ("quickmerge", "tome", "quickmerge-entropy", "random", "pool"):
            curves[row["method"]].append((row["speedup"], 100 * row["accuracy"]))
    unpatched = 100 * next(row["accuracy"] for row in grid if row["method"] == "none")
    past = defaultdict(list)
    names = {key: key.replace("-", " ") for key in ("greedy-entropy", "greedy-constant", "random-constant",
                                                     "pool-constant")}
    r = None
    for row in test:  # each r's untimed rows (r an int) come before its timed rows (r the schedule)
        label = row["setting"].removeprefix("timed ")
        if isinstance(row.get("r"), int) and not row["setting"].startswith("timed "):
            r = row["r"]
        if row["setting"].startswith("timed ") and label in names:
            accuracy = rerun.get((label, r), row["accuracy"])
            past[label].append((speed[f"{names[label]} r={r}"], 100 * accuracy))
        elif row["setting"] == "timed tome":
            past["tome"].append((speed["tome r=98 (every block halves)"], 100 * row["accuracy"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    style = {"tome": ("ToMe-style", "tab:orange", "s"), "quickmerge": ("QuickMerge++ (bipartite)", "tab:blue", "o"),
             "quickmerge-entropy": ("QuickMerge++ entropy (bipartite)", "tab:cyan", "^"),
             "random": ("random drop", "tab:gray", "x"), "pool": ("pooling", "tab:brown", "+")}
    for method, points in curves.items():
        label, colour, marker = style[method]
        ax.plot(*zip(*sorted(points), strict=True), marker=marker, color=colour, label=label, alpha=0.8)
    past_style = {"greedy-entropy": ("QuickMerge++ entropy (greedy, past the cap; stop 65)", "tab:blue", "*", 14),
                  "greedy-constant": ("QuickMerge++ constant r (greedy, past the cap; stop 65)", "tab:purple", "D", 7),
                  "random-constant": ("random drop, same schedule", "tab:gray", "x", 8),
                  "pool-constant": ("pooling, same schedule", "tab:brown", "+", 10),
                  "tome": ("ToMe-style, every block halving", "tab:orange", "s", 9)}
    for key, points in past.items():
        label, colour, marker, size = past_style[key]
        ax.scatter(*zip(*points, strict=True), marker=marker, color=colour, s=size ** 2, label=label,
                   edgecolors="black" if key == "greedy-entropy" else None, zorder=3)
    ax.axhline(unpatched, color="black", linestyle=":", linewidth=1, label=f"unpatched ({unpatched:.2f}%)")
    ax.set_xlabel("speed-up over the unpatched model (batch 256, 2 CPU threads)")
    ax.set_ylabel("top-1 on the 10,000 test images (%)")
    ax.set_title("Fashion-MNIST ViT (90.85%): within ToMe's cap and past it")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig("docs/img/vision_past_tome_cap.png", dpi=120)
    print("wrote docs/img/vision_past_tome_cap.png")


if __name__ == "__main__":
    main()
