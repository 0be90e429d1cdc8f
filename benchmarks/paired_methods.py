"""Paired perplexity ratios of one method against others of the same eval JSON, at each ratio.

    python benchmarks/paired_methods.py docs/results/issue10/text_spans16.json \
        --ours quickmerge-replay-leverage-spans --against quickmerge-replay-proportional quickmerge-replay-pooled \
        --out docs/results/issue10/text_spans16_paired.json

For each compression ratio both methods ran at: ours / other perplexity on the same examples, its 95%
bootstrap interval, and on how many examples ours has the lower NLL (``paired_vs_best.py`` does the
same against the best kvpress press).
"""

from __future__ import annotations

import argparse
import json

from quickmerge.eval.stats import bootstrap_ratio


def paired(results: dict, ours: str, against: list[str]) -> list[dict]:
    rows = {(r["method"], r["compression_ratio"]): r for r in results["summary"]}
    missing = [m for m in [ours, *against] if not any(k[0] == m for k in rows)]
    if missing:
        raise SystemExit(f"--ours/--against: not in the results: {', '.join(missing)}")
    out = []
    for (method, ratio), mine in sorted(rows.items(), key=lambda kv: (kv[0][1] or 0, kv[0][0])):
        if method != ours:
            continue
        for other in against:
            theirs = rows.get((other, ratio))
            if theirs is None:
                continue
            a, b = mine["nll_per_example"], theirs["nll_per_example"]
            rel, low, high = bootstrap_ratio(a, b)
            out.append({"ratio": ratio, "ours": ours, "other": other, "perplexity_ratio": rel, "ci95": [low, high],
                        "ours_lower_on": sum(x < y for x, y in zip(a, b, strict=True)), "examples": len(a)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="an eval JSON (quickmerge eval text / image / video)")
    parser.add_argument("--ours", required=True)
    parser.add_argument("--against", nargs="+", required=True)
    parser.add_argument("--out")
    args = parser.parse_args()
    with open(args.results) as f:
        rows = paired(json.load(f), args.ours, args.against)
    for r in rows:
        print(f"{r['ratio']} {r['ours']} / {r['other']}: {r['perplexity_ratio']:.4f} "
              f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] lower on {r['ours_lower_on']}/{r['examples']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"source": args.results, "paired": rows}, f, indent=1)


if __name__ == "__main__":
    main()
