"""The BENCHMARKS.md tables of stop 88 from the eval decoding JSONs: python docs/results/stop88/tables.py JSON..."""

import json
import sys

from quickmerge.eval.decoding import method_label


def table(path: str) -> str:
    with open(path) as f:
        results = json.load(f)
    lines = [f"{path}: {len(results['examples'])} windows",
             "| S (cache saved) | method | / uncompressed [95% CI] | QuickMerge++ / it, paired [95% CI] (lower on) |",
             "|---|---|---|---|"]
    for size, paired in results["paired"].items():
        rows = sorted((r for r in results["summary"] if r["decoding_size"] == int(size) and r["method"] != "none"),
                      key=lambda r: r["perplexity"])
        for r in rows:
            lo, hi = r["ratio_to_uncompressed_ci95"]
            vs = paired["quickmerge_vs_each"].get(r["method"])
            versus = "" if vs is None else (f"{vs['ratio'][0]:.4f} [{vs['ratio'][1]:.4f}, {vs['ratio'][2]:.4f}] "
                                            f"({vs['lower_on']}/{paired['windows']})")
            name = method_label(r["method"])
            if r["method"] == paired.get("best_kvpress"):
                name += " (best press)"
            lines.append(f"| {size} ({r['memory_saved']:.0%}) | {name} | {r['ratio_to_uncompressed']:.4f} "
                         f"[{lo:.4f}, {hi:.4f}] | {versus} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(path), end="\n\n")
