"""The new default (``quickmerge``, decoding window a third of S) against the old (``quickmerge-w16``) on the same
windows of one run: paired 95% bootstrap intervals with the library's own functions (difference of mean identical
tokens for generation runs, perplexity ratio for teacher-forced ones).

    python docs/results/stop91/new_vs_old.py OUT.json RUN.json [RUN.json ...]
"""

import json
import sys

from quickmerge.eval.stats import bootstrap_difference, bootstrap_ratio


def compare(path: str) -> list[dict]:
    with open(path) as f:
        results = json.load(f)
    out = []
    for size in sorted({r["decoding_size"] for r in results["summary"]}):
        rows = {r["method"]: r for r in results["summary"] if r["decoding_size"] == size}
        new, old = rows["quickmerge"], rows["quickmerge-w16"]
        if "identical_tokens_per_example" in new:
            a, b = new["identical_tokens_per_example"], old["identical_tokens_per_example"]
            out.append({"run": path, "size": size, "measure": "identical tokens, new minus old",
                        "difference": list(bootstrap_difference(a, b)),
                        "longer_on": sum(x > y for x, y in zip(a, b, strict=True)),
                        "shorter_on": sum(x < y for x, y in zip(a, b, strict=True))})
        else:
            a, b = new["nll_per_example"], old["nll_per_example"]
            out.append({"run": path, "size": size, "measure": "perplexity, new / old",
                        "ratio": list(bootstrap_ratio(a, b)),
                        "lower_on": sum(x < y for x, y in zip(a, b, strict=True))})
    return out


if __name__ == "__main__":
    rows = [row for path in sys.argv[2:] for row in compare(path)]
    with open(sys.argv[1], "w") as f:
        json.dump(rows, f, indent=1)
    for row in rows:
        print(json.dumps(row))
