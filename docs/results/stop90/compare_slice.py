"""The teacher-forced slice before (7e97287, a worktree) and after this stop's refactor of ``continuation_nll`` into
``decode``: every row's per-window NLL and cache length, compared to the bit.

    python docs/results/stop90/compare_slice.py logs/s90/slice_before.json logs/s90/slice_after.json \
        docs/results/stop90/refactor_slice.json
"""

import json
import sys
from pathlib import Path

before, after = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])


def key(row: dict) -> tuple:
    return row["method"], row["decoding_size"]


a = {key(r): r for r in before["summary"]}
b = {key(r): r for r in after["summary"]}
assert a.keys() == b.keys(), (a.keys(), b.keys())
rows = []
for k in sorted(a, key=str):
    old, new = a[k]["nll_per_example"], b[k]["nll_per_example"]
    same = old == new and a[k]["mean_cache_entries"] == b[k]["mean_cache_entries"]
    rows.append({"method": k[0], "size": k[1], "identical_to_the_bit": same,
                 "max_abs_difference": max(abs(x - y) for x, y in zip(old, new, strict=True)),
                 "perplexity": [a[k]["perplexity"], b[k]["perplexity"]]})
summary = {"before": sys.argv[1], "after": sys.argv[2], "rows": rows,
           "all_identical": all(r["identical_to_the_bit"] for r in rows)}
Path(sys.argv[3]).write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
