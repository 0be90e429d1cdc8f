"""How many continuations of a generation journal end in an exact loop: the shortest period p <= 128 with which
the last 256 generated tokens repeat, per method.

    python docs/results/stop90/greedy_loops.py docs/results/stop90/generation_smollm2_greedy.journal \
        docs/results/stop90/greedy_loops.json
"""

import json
import sys
from pathlib import Path


def period(tokens: list[int], tail: int = 256, longest: int = 128) -> int | None:
    end = tokens[-tail:]
    return next((p for p in range(1, longest + 1) if all(end[i] == end[i - p] for i in range(p, len(end)))), None)


rows = {}
for path in sorted(Path(sys.argv[1]).glob("rank*.jsonl")):
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        rows[entry["key"]] = entry["row"]["tokens"]
by_method: dict[str, list[int | None]] = {}
for key, tokens in rows.items():
    by_method.setdefault(key.split("|")[2], []).append(period(tokens))
summary = {m: {"windows": len(ps), "looping": sum(p is not None for p in ps),
               "periods": sorted(p for p in ps if p is not None)} for m, ps in by_method.items()}
Path(sys.argv[2]).write_text(json.dumps({"journal": sys.argv[1], "tail": 256, "longest_period": 128,
                                         "by_method": summary}, indent=2))
for m, s in summary.items():
    print(f"{m}: {s['looping']}/{s['windows']} end in a loop")
