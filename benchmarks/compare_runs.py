"""Compare two result JSONs of `quickmerge eval text` or `quickmerge eval vision` (refactor checks).

    python benchmarks/compare_runs.py before.json after.json

Text: per-example NLLs of every (method, ratio) present in both runs must be equal to the
last bit. Vision: top-1 accuracy (and the number of images) of every (method, r) in both.
Exit status 0 when identical, 1 otherwise; one line per compared setting.
"""

from __future__ import annotations

import json
import sys


def _text_rows(results: dict) -> dict:
    return {(r["method"], r["compression_ratio"]): r["nll_per_example"] for r in results["summary"]}


def _vision_rows(results: dict) -> dict:
    return {(r["method"], json.dumps(r["r"]), json.dumps(r.get("settings", {}), sort_keys=True)):
            (r["accuracy"], r["images"]) for r in results["rows"]}


def compare(before: dict, after: dict) -> bool:
    if "summary" in before:
        if before["examples"] != after["examples"]:
            print("different examples")
            return False
        a, b = _text_rows(before), _text_rows(after)
    else:
        a, b = _vision_rows(before), _vision_rows(after)
    same = True
    for key in sorted(set(a) & set(b), key=str):
        equal = a[key] == b[key]
        same &= equal
        print(f"{'identical' if equal else 'DIFFERENT'}  {key}" + ("" if equal else f"  {a[key]} vs {b[key]}"))
    for key in sorted(set(a) ^ set(b), key=str):
        print(f"only in one run: {key}")
    return same and set(a) == set(b)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f1, open(sys.argv[2]) as f2:
        sys.exit(0 if compare(json.load(f1), json.load(f2)) else 1)
