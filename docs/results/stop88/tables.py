"""The BENCHMARKS.md tables of stop 88 from the eval decoding JSONs: python docs/results/stop88/tables.py JSON...

Each JSON: the uncompressed perplexity per budget, then every method's ratio to it and QuickMerge++'s paired ratio to
each press; for clip windows named ``clip@frame`` (the held-out video windows) also the mean ratio to uncompressed per
source (vtest.avi, Megamind.avi, Moving Fashion-MNIST) for QuickMerge++, StreamingLLM and SnapKV at window 63.
"""

import json
import math
import sys

from quickmerge.eval.decoding import method_label


def table(path: str) -> str:
    with open(path) as f:
        results = json.load(f)
    none = {r["decoding_size"]: r["perplexity"] for r in results["summary"] if r["method"] == "none"}
    lines = [f"{path}: {len(results['examples'])} windows; uncompressed perplexity by S: "
             + ", ".join(f"{s} {p:.3f}" for s, p in none.items()),
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
    return "\n".join(lines + by_source(results))


def by_source(results: dict) -> list[str]:
    """exp(mean NLL difference to uncompressed) per source of the windows, per budget (held-out video windows)."""
    names = results["examples"]
    if not all("@" in n for n in names):
        return []
    source = ["moving-fashion" if n.startswith("moving-fashion") else n.split("@")[0] for n in names]
    lines = ["", "| S | source (windows) | QuickMerge++ | StreamingLLM | SnapKV w63 |", "|---|---|---|---|---|"]
    for size in sorted({r["decoding_size"] for r in results["summary"]}):
        nll = {r["method"]: r["nll_per_example"] for r in results["summary"] if r["decoding_size"] == size}
        for name in dict.fromkeys(source):
            at = [i for i, s in enumerate(source) if s == name]

            def ratio(method: str, at: list[int] = at, nll: dict = nll) -> str:
                if method not in nll:
                    return "-"
                return f"{math.exp(sum(nll[method][i] - nll['none'][i] for i in at) / len(at)):.4f}"

            lines.append(f"| {size} | {name} ({len(at)}) | {ratio('quickmerge')} | {ratio('kvpress-streaming-llm')} | "
                         f"{ratio('kvpress-snapkv-w63')} |")
    return lines


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(table(path), end="\n\n")
