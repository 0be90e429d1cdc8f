"""How close a shipped configuration comes to the check that refuses a layer budget smaller than replay scoring's
protected entries (the first ``sinks`` and the last ``recent``): runs a ``quickmerge`` command with
``QuickMergePress.merge`` wrapped to record, for every replay-scored layer compression, the layer's budget per head
and the protected count, then prints (and with ``--json`` writes) the smallest margin (stop 66).

    python benchmarks/exploration/protected_margin.py --json OUT.json -- eval image --examples 40 --ratios 0.25 0.5 0.75 \
        --methods quickmerge-replay-row --threads 2 --out /tmp/probe --fresh
"""

import argparse
import json

import quickmerge.text.quickmerge_press as press_module
from quickmerge.cli import main as cli


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the quickmerge command, after --")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    seen = []
    merge = press_module.QuickMergePress.merge

    def recording(self, module, keys, values, scores, kept):
        if self.scoring == "replay":
            length = keys.shape[2]
            seen.append({"ratio": self.compression_ratio, "layer": module.layer_idx, "length": length, "kept": kept,
                         "protected": min(length, self.sinks + self.recent)})
        return merge(self, module, keys, values, scores, kept)

    press_module.QuickMergePress.merge = recording
    cli(command)
    summary = {"command": "quickmerge " + " ".join(command), "compressions": len(seen),
               "short": sum(s["kept"] < s["protected"] for s in seen),
               "smallest_margin": min((s["kept"] - s["protected"] for s in seen), default=None),
               "per_ratio": {str(r): min(s["kept"] - s["protected"] for s in seen if s["ratio"] == r)
                             for r in sorted({s["ratio"] for s in seen})}}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
