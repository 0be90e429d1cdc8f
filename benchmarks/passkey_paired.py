"""Paired differences of passkey accuracy: one method against every other of an ``eval passkey`` run, per ratio.

    python benchmarks/passkey_paired.py results/passkey_gemma_once.json --ours quickmerge-replay \
        --out docs/results/issue10/passkey_gemma_once_paired.json
Several runs on the same trials (same seed, needle and answered trials, e.g. a later run of one more method) are
paired row by row: ``passkey_paired.py run_a.json run_b.json --ours M``. Runs on disjoint trials of the same seed
and needle (``eval passkey --first``) are pooled: the (method, ratio) rows every group of trials has, concatenated.
``--extra JSON --extra-ratio R``: ``ours`` is instead a row of ``passkey_pooled.py --answered-from`` (same trials),
paired against every method of the run at ratio R.
"""
import argparse
import json

from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--ours", required=True)
    ap.add_argument("--extra", default=None)
    ap.add_argument("--extra-ratio", type=float, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None, help="PNG: every run's rows in one figure (the eval's own plot)")
    args = ap.parse_args()
    groups: dict[tuple, dict] = {}  # answered trials -> {(method, ratio): per-trial list}
    run, summary = None, {}
    for path in args.runs:
        with open(path) as f:
            this = json.load(f)
        if run is not None and (this["config"].get("needle") != run["config"].get("needle")
                                or this["config"].get("seed") != run["config"].get("seed")):
            raise SystemExit(f"{path} ran on another seed or needle than {args.runs[0]}")
        run = this
        rows = groups.setdefault(tuple(this["answered_only"]["trials_answered"]), {})
        for r in this["summary"]:
            summary.setdefault((r["method"], r["compression_ratio"]), r)
            if r["compression_ratio"] is not None:
                rows.setdefault((r["method"], r["compression_ratio"]), r["correct_per_trial"])
    answered = [t for trials in groups for t in trials]
    if len(set(answered)) != len(answered):
        raise SystemExit("runs on overlapping but different trials: pool only disjoint trials (eval passkey --first)")
    rows = {key: [x for g in groups.values() for x in g[key]] for key in next(iter(groups.values()))
            if all(key in g for g in groups.values())}
    if args.extra:
        with open(args.extra) as f:
            extra = json.load(f)
        if len(groups) > 1 or extra["answered"] != run["answered_only"]["trials_answered"]:
            raise SystemExit("--extra ran on other trials than the run")
        rows[(args.ours, args.extra_ratio)] = extra["per_trial"][args.ours]
    paired = []
    for (method, ratio), other in rows.items():
        if ratio is None or method == args.ours or (args.ours, ratio) not in rows:
            continue
        ours = rows[(args.ours, ratio)]
        m, lo, hi = bootstrap_difference(ours, other)
        pairs = list(zip(ours, other, strict=True))
        paired.append({"ratio": ratio, "ours": args.ours, "accuracy": bootstrap_mean(ours), "press": method,
                       "press_accuracy": bootstrap_mean(other), "trials": len(ours),
                       "ours_minus_press": m, "ci95": [lo, hi], "only_ours": sum(a > b for a, b in pairs),
                       "only_press": sum(a < b for a, b in pairs)})
        print(ratio, method, f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    if args.plot:
        from quickmerge.eval.passkey_cli import plot_passkey

        if len(groups) > 1:  # each run's own summary covers its trials only: summarise the pooled rows
            summary = {key: {"method": key[0], "compression_ratio": key[1], "accuracy": bootstrap_mean(v)[0],
                             "accuracy_ci95": list(bootstrap_mean(v)[1:])} for key, v in rows.items()}
            summary[("none", None)] = {"method": "none", "compression_ratio": None, "accuracy": 1.0,
                                       "accuracy_ci95": [1.0, 1.0]}  # answered-only: the trials it answers
        plot_passkey({"summary": list(summary.values())}, args.plot,
                     f"passkey ({run['config'].get('needle', 'landmark')} needle): the {len(answered)} trials the "
                     f"uncompressed model answers, {len(args.runs)} runs")
    with open(args.out, "w") as f:
        json.dump({"source": args.runs, "extra": args.extra, "trials_answered": answered, "paired": paired}, f,
                  indent=1)


if __name__ == "__main__":
    main()
