"""Amendment 3: the new default (``quickmerge`` of RUN_A) against a press of another run on the same windows
(RUN_B), paired by window name, with the library's bootstrap; refuses unless the two runs' uncompressed
generations scored the same tokens (``none``'s identical tokens per window equal).

    python docs/results/stop92/pair_runs.py OUT.json RUN_A.json RUN_B.json METHOD_B
"""

import json
import sys

from quickmerge.eval.stats import bootstrap_difference


def per_window(results: dict, method: str) -> dict[str, float]:
    (row,) = [r for r in results["summary"] if r["method"] == method]
    return dict(zip(results["examples"], row["identical_tokens_per_example"], strict=True))


def main(out: str, path_a: str, path_b: str, method_b: str) -> dict:
    runs = []
    for path in (path_a, path_b):
        with open(path) as f:
            runs.append(json.load(f))
    a, b = runs
    if a["examples"] != b["examples"] or per_window(a, "none") != per_window(b, "none"):
        raise SystemExit("the two runs do not hold the same windows and uncompressed generations")
    ours, theirs = per_window(a, "quickmerge"), per_window(b, method_b)
    x = [ours[e] for e in a["examples"]]
    y = [theirs[e] for e in a["examples"]]
    row = {"a": path_a, "b": path_b, "method_b": method_b, "windows": len(x),
           "quickmerge_identical_tokens": sum(x) / len(x), "method_b_identical_tokens": sum(y) / len(y),
           "quickmerge_minus_method_b": list(bootstrap_difference(x, y)),
           "longer_on": sum(p > q for p, q in zip(x, y, strict=True)),
           "shorter_on": sum(p < q for p, q in zip(x, y, strict=True))}
    with open(out, "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main(*sys.argv[1:5])
