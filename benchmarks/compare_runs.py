"""Compare two result JSONs of `quickmerge eval text|image|video`, `quickmerge eval vision` or
`benchmarks/video_vit_fashion.py eval` (refactor checks, one run on the CPU against one on a GPU).

    python benchmarks/compare_runs.py before.json after.json [--json differences.json] [--shared-only]

Text: per-example NLLs of every (method, ratio) present in both runs must be equal to the
last bit. Vision: top-1 accuracy (and the number of images) of every (method, r) in both. Per-clip hits
(``video_vit_fashion.py``): every clip's hit or miss of every setting in both.
Exit status 0 when identical and both runs have the same settings (``--shared-only``: the settings of one run only
do not count), 1 otherwise; one line per compared setting. ``--json`` writes how far each setting
moved: text, the largest per-example NLL difference (nats), how many examples moved by more than 1e-4 and both
runs' ``ratio_to_uncompressed``; vision, both accuracies; per-clip hits, how many clips changed.
"""

from __future__ import annotations

import argparse
import json
import sys


def _text_rows(results: dict) -> dict:
    return {(r["method"], r["compression_ratio"]): r["nll_per_example"] for r in results["summary"]}


def _vision_rows(results: dict) -> dict:
    return {(r["method"], json.dumps(r["r"]), json.dumps(r.get("settings", {}), sort_keys=True)):
            (r["accuracy"], r["images"]) for r in results["rows"]}


def _per_clip(results: dict) -> bool:
    return "summary" not in results and "hits" in results


def differences(before: dict, after: dict) -> list[dict]:
    """How far each setting present in both runs moved (see the module docstring)."""
    if _per_clip(before):
        a, b = before["hits"], after["hits"]
        return [{"setting": key, "clips_changed": sum(x != y for x, y in zip(a[key], b[key], strict=True)),
                 "clips": len(a[key])} for key in sorted(set(a) & set(b))]
    if "summary" not in before:
        a, b = _vision_rows(before), _vision_rows(after)
        return [{"setting": list(key), "accuracy": [a[key][0], b[key][0]]} for key in sorted(set(a) & set(b), key=str)]
    ratio = {}
    for name, run in (("before", before), ("after", after)):
        for r in run["summary"]:
            ratio.setdefault((r["method"], r["compression_ratio"]), {})[name] = r["ratio_to_uncompressed"]
    a, b = _text_rows(before), _text_rows(after)
    rows = []
    for key in sorted(set(a) & set(b), key=str):
        moved = [abs(x - y) for x, y in zip(a[key], b[key], strict=True)]
        rows.append({"method": key[0], "compression_ratio": key[1], "max_abs_nll_difference": max(moved),
                     "examples_moved_over_1e-4": sum(m > 1e-4 for m in moved), "examples": len(moved),
                     "ratio_to_uncompressed": [ratio[key]["before"], ratio[key]["after"]]})
    return rows


def compare(before: dict, after: dict, shared_only: bool = False) -> bool:
    if _per_clip(before):
        a, b = before["hits"], after["hits"]
    elif "summary" in before:
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
    return same and (shared_only or set(a) == set(b)) and bool(set(a) & set(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--json", default=None, help="write how far each setting moved here")
    parser.add_argument("--shared-only", action="store_true",
                        help="exit 0 when the settings both runs have are identical, whatever only one has")
    args = parser.parse_args()
    with open(args.before) as f1, open(args.after) as f2:
        first, second = json.load(f1), json.load(f2)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"before": args.before, "after": args.after, "settings": differences(first, second)}, f,
                      indent=2)
    sys.exit(0 if compare(first, second, args.shared_only) else 1)


if __name__ == "__main__":
    main()
