"""Replace rows of an `eval text|image|video` result with a rerun's rows on the same examples.

    python benchmarks/replace_rows.py OLD.json NEW.json --out MERGED.json [--methods M ...]

For a change of code that moves only some methods: rerun those (with the uncompressed model, which every run
has) and put their rows into a copy of the old run, so that rankings and paired comparisons against the methods
not rerun (e.g. with ``benchmarks/paired_vs_best.py``) stay on one set of examples. Refuses runs of another
protocol, other examples (titles, in order) or an uncompressed NLL further than ``--tolerance`` (nats) from the old
one on any example: each is a sign that the two runs did not score the same thing (runs months apart, under other
torch builds, differ by ~1e-7). Every (method, ratio) of NEW other than ``none`` replaces OLD's, or is
added; ``--methods`` limits that to the methods named. The merged result's ``config`` says which rows came from
where (``replaced_rows``, ``replaced_from``).
"""

from __future__ import annotations

import argparse
import json

# The model is compared by what it computes (the uncompressed NLLs), not by name: a path and the shipped name may
# be the same weights.
SAME = ("protocol", "video", "context", "continuation", "task")


def replace_rows(old: dict, new: dict, methods: list[str] | None = None,
                 tolerance: float = 1e-5) -> tuple[dict, list[dict]]:
    """``old`` with ``new``'s rows in place of its own, and the replaced rows' before/after ratios to none."""
    differ = [k for k in SAME if old["config"].get(k) != new["config"].get(k)]
    if differ or old.get("format") != new.get("format"):
        raise SystemExit(f"the runs differ in {differ or ['format']}: rows can replace rows of the same protocol only")
    if old["examples"] != new["examples"]:
        raise SystemExit(f"the runs score other examples ({len(old['examples'])} vs {len(new['examples'])}, "
                         "or another order): rows can replace rows on the same examples only")
    rows = {(r["method"], r["compression_ratio"]): r for r in old["summary"]}
    fresh = {(r["method"], r["compression_ratio"]): r for r in new["summary"]}
    if ("none", None) not in fresh:
        raise SystemExit("NEW has no uncompressed row ('none'): rerun with it, to show both runs score the same")
    apart = max(abs(a - b) for a, b in zip(fresh["none", None]["nll_per_example"],
                                           rows["none", None]["nll_per_example"], strict=True))
    if apart > tolerance:
        raise SystemExit(f"the uncompressed model's NLLs differ between the runs by up to {apart:.2e} nats (more "
                         f"than --tolerance {tolerance:g}): not the same model and data")
    if methods is not None:
        unknown = sorted(set(methods) - {m for m, _ in fresh})
        if unknown:
            raise SystemExit(f"--methods: not in NEW: {', '.join(unknown)}")
    changed = []
    for key, row in fresh.items():
        if key[0] == "none" or (methods is not None and key[0] not in methods):
            continue
        before = rows.get(key)
        changed.append({"method": key[0], "compression_ratio": key[1],
                        "ratio_to_uncompressed": [before and before["ratio_to_uncompressed"],
                                                  row["ratio_to_uncompressed"]]})
        rows[key] = row
    merged = dict(old, summary=list(rows.values()))
    merged["config"] = dict(old["config"], replaced_rows=[[c["method"], c["compression_ratio"]] for c in changed],
                            replaced_from=new["config"], uncompressed_nll_apart=apart)
    return merged, changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="replace only these methods' rows")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="largest difference of an uncompressed NLL between the runs, in nats (default 1e-5)")
    args = parser.parse_args()
    with open(args.old) as f:
        old = json.load(f)
    with open(args.new) as f:
        new = json.load(f)
    merged, changed = replace_rows(old, new, args.methods, args.tolerance)
    for c in changed:
        before, after = c["ratio_to_uncompressed"]
        shown = "(new)" if before is None else f"{before:.4f}"
        print(f"{c['method']} @ {c['compression_ratio']}: vs none {shown} -> {after:.4f}")
    with open(args.out, "w") as f:
        json.dump(merged, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
