"""Does ``quickmerge-w16`` of a stop-92 run reproduce the ``quickmerge`` rows of the run it reruns (the default was
window 16 then)? Per window and budget, the largest absolute NLL difference (nats per token), for each method present
in both runs under the names given (OLD_METHOD=NEW_METHOD; the presses under their own names).

    python docs/results/stop92/reproduce.py OUT.json OLD.json NEW.json [OLD.json NEW.json ...]
"""

import json
import sys


def compare(old_path: str, new_path: str) -> dict:
    runs = []
    for path in (old_path, new_path):
        with open(path) as f:
            runs.append(json.load(f))
    old, new = runs
    renamed = {"quickmerge": "quickmerge-w16"}
    rows = []
    for r_old in old["summary"]:
        target = renamed.get(r_old["method"], r_old["method"])
        for r_new in new["summary"]:
            if r_new["method"] != target or r_new["decoding_size"] != r_old["decoding_size"]:
                continue
            at_old = dict(zip(old["examples"], r_old["nll_per_example"], strict=True))
            at_new = dict(zip(new["examples"], r_new["nll_per_example"], strict=True))
            common = [e for e in new["examples"] if e in at_old]
            rows.append({"old_method": r_old["method"], "new_method": target, "size": r_old["decoding_size"],
                         "windows": len(common), "windows_new": len(new["examples"]),
                         "max_abs_nll_difference": max(abs(at_old[e] - at_new[e]) for e in common),
                         "perplexity_old": r_old["perplexity"], "perplexity_new": r_new["perplexity"]})
    return {"old": old_path, "new": new_path, "rows": rows}


if __name__ == "__main__":
    pairs = sys.argv[2:]
    out = [compare(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
    for run in out:
        for row in run["rows"]:
            print(run["new"], json.dumps(row))
