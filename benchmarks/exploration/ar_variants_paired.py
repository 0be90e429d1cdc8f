"""Paired perplexity ratio of every row of an ``ar_variants.py`` JSON against one of its rows (same examples).

    python benchmarks/exploration/ar_variants_paired.py docs/results/issue12/video_dev_s24.json kvpress-streaming-llm@0.5
"""
import json
import sys

from quickmerge.eval.stats import bootstrap_ratio


def main() -> None:
    path, against = sys.argv[1], sys.argv[2]
    with open(path) as f:
        nll = json.load(f)["per_example_nll"]
    for name, values in nll.items():
        if name in (against, "none"):
            continue
        rel, low, high = bootstrap_ratio(values, nll[against])
        lower = sum(a < b for a, b in zip(values, nll[against], strict=True))
        print(f"{name} / {against}: {rel:.4f} [{low:.4f}, {high:.4f}], lower on {lower}/{len(values)}")


if __name__ == "__main__":
    main()
