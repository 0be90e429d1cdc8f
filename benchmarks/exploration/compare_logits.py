"""Compare two torch.save'd dicts of logits (``logits_check.py``, ``tie_check_vision.py``) setting by setting.

    python benchmarks/exploration/compare_logits.py BEFORE.pt AFTER.pt [--json OUT]

Per setting: the largest absolute difference, the rows whose argmax changed and, where the dict holds ``labels``,
top-1 before and after.
"""
import argparse
import json

import torch

parser = argparse.ArgumentParser()
parser.add_argument("before")
parser.add_argument("after")
parser.add_argument("--json")
args = parser.parse_args()
before, after = torch.load(args.before), torch.load(args.after)
labels = before.pop("labels", None)
after.pop("labels", None)
if set(before) != set(after):
    raise SystemExit(f"the two files hold different settings: {sorted(set(before) ^ set(after))}")
rows = []
for name in before:
    b, a = before[name].float(), after[name].float()
    row = {"setting": name, "identical": bool(torch.equal(b, a)), "max_abs_difference": (b - a).abs().max().item()}
    if b.dim() == 2:
        row["rows_changing_argmax"] = int((b.argmax(-1) != a.argmax(-1)).sum())
        row["rows"] = b.shape[0]
    if labels is not None and b.shape[0] == labels.shape[0]:
        row["top1_before"] = (b.argmax(-1) == labels).float().mean().item()
        row["top1_after"] = (a.argmax(-1) == labels).float().mean().item()
    rows.append(row)
    print(json.dumps(row))
summary = {"settings": len(rows), "identical_to_the_bit": sum(r["identical"] for r in rows), "rows": rows}
print(f"{summary['identical_to_the_bit']} of {len(rows)} settings identical to the bit")
if args.json:
    with open(args.json, "w") as f:
        json.dump(summary, f, indent=1)
