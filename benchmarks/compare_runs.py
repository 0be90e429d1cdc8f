"""Compare two result JSONs of `quickmerge eval text|image|video`, `quickmerge eval vision` or
`benchmarks/video_vit_fashion.py eval` (refactor checks, one run on the CPU against one on a GPU).

    python benchmarks/compare_runs.py before.json after.json [--json differences.json] [--shared-only]

Text: per-example NLLs of every (method, ratio) present in both runs must be equal to the
last bit. Vision: top-1 accuracy (and the number of images) of every (method, r) in both, and which images it
got right where both rows keep their ``hits`` (``eval vision`` since stop 83). Per-clip hits
(``video_vit_fashion.py``): every clip's hit or miss of every setting in both.
Exit status 0 when identical and both runs have the same settings (``--shared-only``: the settings of one run only
do not count), 1 otherwise; one line per compared setting. ``--json`` writes how far each setting
moved: text, the largest per-example NLL difference (nats), how many examples moved by more than 1e-4 and both
runs' ``ratio_to_uncompressed``; vision, both accuracies (and how many images changed, where both keep hits);
per-clip hits, how many clips changed.
"""

from __future__ import annotations

import argparse
import json
import sys


def _text_rows(results: dict) -> dict:
    return {(r["method"], r["compression_ratio"]): r["nll_per_example"] for r in results["summary"]}


def _vision_rows(results: dict) -> dict:
    return {(r["method"], json.dumps(r["r"]), json.dumps(r.get("settings", {}), sort_keys=True)):
            (r["accuracy"], r["images"], r.get("hits")) for r in results["rows"]}


def _images_changed(a: str | None, b: str | None) -> int | None:
    """Images right in one run and wrong in the other, from two rows' packed hits (None: a row keeps none)."""
    return None if a is None or b is None else bin(int(a, 16) ^ int(b, 16)).count("1")


def _same_vision(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and _images_changed(a[2], b[2]) in (None, 0)


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
        rows = []
        for key in sorted(set(a) & set(b), key=str):
            changed = _images_changed(a[key][2], b[key][2])
            rows.append({"setting": list(key), "accuracy": [a[key][0], b[key][0]]}
                        | ({} if changed is None else {"images_changed": changed}))
        return rows
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
    vision = not _per_clip(before) and "summary" not in before
    same = True
    for key in sorted(set(a) & set(b), key=str):
        equal = _same_vision(a[key], b[key]) if vision else a[key] == b[key]
        same &= equal
        shown = ((f"accuracy {a[key][0]} vs {b[key][0]}, images changed: {_images_changed(a[key][2], b[key][2])}")
                 if vision else f"{a[key]} vs {b[key]}")
        print(f"{'identical' if equal else 'DIFFERENT'}  {key}" + ("" if equal else f"  {shown}"))
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
