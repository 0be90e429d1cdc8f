"""Summarise pytest logs written with ``--durations=0`` into ``suite_durations.json`` (stop 89).

    python docs/results/stop89/suite_durations.py LABEL=logs/s89/baseline.log LABEL=... [--out PATH] [--top 20]

Per run: the wall time pytest printed, passed / skipped / failed, the summed durations of every phase (setup, call,
teardown: more than the wall time under two workers), and the slowest tests. A test's phases are summed.
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^(\d+\.\d+)s (setup|call|teardown)\s+(\S+)")
SUMMARY = re.compile(r"^=*\s*(.*) in (\d+\.\d+)s")


def summarise(path: Path, top: int) -> dict:
    per_test: dict[str, float] = defaultdict(float)
    summary = None
    for line in path.read_text(errors="replace").splitlines():
        if m := LINE.match(line):
            per_test[m.group(3)] += float(m.group(1))
        elif (m := SUMMARY.match(line)) and ("passed" in m.group(1) or "failed" in m.group(1)):
            summary = m
    if summary is None:
        raise SystemExit(f"{path}: no pytest summary line (did the run finish?)")
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|errors?|deselected)",
                                                        summary.group(1))}
    slowest = sorted(per_test.items(), key=lambda kv: -kv[1])[:top]
    return {"log": str(path), "wall_s": float(summary.group(2)), **counts,
            "summed_durations_s": round(sum(per_test.values()), 2),
            "slowest": [{"test": name, "s": round(s, 2)} for name, s in slowest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=LOG")
    parser.add_argument("--out", default="docs/results/stop89/suite_durations.json")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    for run in args.runs:
        label, _, log = run.partition("=")
        if not log:
            parser.error(f"runs: expected LABEL=LOG, got {run!r}")
        data[label] = summarise(Path(log), args.top)
        print(f"{label}: {data[label]['wall_s']:.1f} s, {data[label].get('passed', 0)} passed, "
              f"{data[label].get('skipped', 0)} skipped, {data[label].get('failed', 0)} failed")
    out.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
