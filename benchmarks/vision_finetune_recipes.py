"""Fine-tuning recipes side by side: QuickMerge++ fine-tuned minus ToMe-style fine-tuned, per seed, one PNG.

Each argument is ``LABEL=SEEDS.json`` (a summary of benchmarks/vision_finetune_seeds.py); every
seed's paired difference at the compared speed-up is drawn with its 95% interval, and the mean
over seeds (with its pooled interval where the summary has one).

    python benchmarks/vision_finetune_recipes.py "labels only=docs/results/issue11/finetune_ref90_seeds.json" \
        "self-distillation=docs/results/issue11/finetune_sd_ref90_seeds.json" --out docs/img/vision_finetune_recipes.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PAIR = ("fine-tuned quickmerge + quickmerge", "fine-tuned tome + tome")


def difference_rows(summary: dict, at: str) -> dict:
    """The QuickMerge++ - ToMe-style row of a seeds summary at ``at`` (e.g. ``"2.0x"``)."""
    rows = [r for r in summary["rows"] if r["at"] == at and (r["a"], r["b"]) == PAIR]
    if not rows:
        raise SystemExit(f"no {PAIR[0]} - {PAIR[1]} row at {at!r} in this summary")
    return rows[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+", metavar="LABEL=SEEDS.json")
    ap.add_argument("--at", default="2.0x", help="the compared place: a speed-up ('2.0x') or 'r=40'")
    ap.add_argument("--out", required=True, help="PNG path")
    args = ap.parse_args()
    recipes = []
    for item in args.recipes:
        label, sep, path = item.rpartition("=")  # a label may hold "=" ("r = 88"), a path rarely
        if not sep or not Path(path).is_file():
            ap.error(f"recipes: expected LABEL=SEEDS.json with an existing file, got {item!r}")
        recipes.append((label, difference_rows(json.loads(Path(path).read_text()), args.at)))

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.9 * len(recipes)))
    for y, (_, row) in enumerate(reversed(recipes)):
        seeds = row["difference_pt_per_seed"]
        for k, (d, (lo, hi)) in enumerate(zip(seeds, row["intervals_pt_per_seed"], strict=True)):
            top = y + 0.1 + 0.12 * (len(seeds) - 1 - k)  # seed 0 on top
            ax.errorbar(d, top, xerr=[[d - lo], [hi - d]], fmt="o", color="0.55", ms=4, capsize=2,
                        label="one seed, 95% CI" if y == 0 and k == 0 else None)
        mean = row["mean_pt"]
        if "pooled_pt" in row:
            _, lo, hi = row["pooled_pt"]
            ax.errorbar(mean, y - 0.2, xerr=[[mean - lo], [hi - mean]], fmt="D", color="C3", ms=8, capsize=4, lw=2,
                        label="mean of the seeds, pooled 95% CI" if y == 0 else None)
        else:
            ax.plot(mean, y - 0.2, "D", color="C3", ms=8, label="mean of the seeds" if y == 0 else None)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_yticks(range(len(recipes)), [label for label, _ in reversed(recipes)])
    ax.set_xlabel(f"QuickMerge++ fine-tuned - ToMe-style fine-tuned, top-1 points at {args.at}")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130, bbox_inches="tight")  # long recipe labels: keep the axis label whole
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
