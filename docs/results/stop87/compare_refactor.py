"""Stop 87 refactor proof: `quickmerge eval decoding`'s per-window NLLs (windows 0-15, S 192, I 64, prompt 128, batch
16) against `benchmarks/decoding_merge.py`'s journal on the same windows: the base code (af64ca9) run on this machine
in this stop, and stop 85's run (another machine).

    python docs/results/stop87/compare_refactor.py
"""

import json
from pathlib import Path

import torch

HERE = Path(__file__).parent
BENCHMARKS = {"af64ca9_this_machine": HERE / "refactor_benchmark_af64ca9_w0-15.journal.json",
              "stop85": HERE.parent / "stop85" / "decoding_merge.journal.json"}
new = {}
for line in (HERE / "refactor_cli_w0-15.journal" / "rank0.jsonl").read_text().splitlines():
    entry = json.loads(line)
    new[entry["key"]] = entry["row"]
first = 192 + 64 - 128 + 1  # DecodingBudget(128, 192, 64).first_scored
report = {}
for name, path in BENCHMARKS.items():
    old = json.loads(path.read_text())
    report[name] = {}
    for method in ("none", "quickmerge", "kvpress-snapkv", "kvpress-tova"):
        size = "None" if method == "none" else "192"
        rows = sorted((int(k.split("|")[0]), v) for k, v in new.items() if k.endswith(f"|{method}|{size}"))
        assert [i for i, _ in rows] == list(range(16)), rows
        ours = ([float(torch.tensor(v["nll_tokens"])[first:].mean()) for _, v in rows] if method == "none"
                else [v["nll"] for _, v in rows])
        theirs = old[f"{method}/0"]["nll"]
        diff = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
        same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        cache = [rows[0][1]["cache"], old[f"{method}/0"]["cache"]]
        report[name][method] = {"max_abs_nll_difference": diff, "identical_windows": same,
                                "mean_cache_cli_and_benchmark": cache}
        print(f"{name:22s} {method:16s} max |NLL difference| {diff:.3g} (identical on {same}/16), "
              f"cache {cache[0]:.2f} vs {cache[1]:.2f}")
(HERE / "refactor_cli_w0-15_vs_benchmark.json").write_text(json.dumps(report, indent=1))
