"""Stop 91's decision rule (plan_s91.md, item 1) applied to the three development runs.

    python docs/results/stop91/window_choice.py docs/results/stop91/dev_teacher.json \
        docs/results/stop91/dev_greedy.json docs/results/stop91/dev_t1.json docs/results/stop91/window_choice.json
"""

import json
import math
import sys

BASE, CANDIDATES = "quickmerge", ("quickmerge-w32", "quickmerge-w63")


def rows(path: str) -> dict[str, dict]:
    with open(path) as f:
        return {row["method"]: row for row in json.load(f)["summary"]}


def main(teacher: str, greedy: str, t1: str, out: str) -> None:
    tf, gr, sa = rows(teacher), rows(greedy), rows(t1)

    def nll(method: str) -> float:
        per = tf[method]["nll_per_example"]  # every window scores the same number of tokens
        return sum(per) / len(per)

    result = {"base": BASE, "rule": "plan_s91.md item 1", "candidates": {}}
    for method in (BASE, *CANDIDATES):
        result["candidates"][method] = {
            "teacher_forced_perplexity": math.exp(nll(method)),
            "teacher_forced_vs_window16": math.exp(nll(method) - nll(BASE)),
            "greedy_identical_tokens": gr[method]["identical_tokens"],
            "t1_identical_tokens": sa[method]["identical_tokens"],
        }
    base = result["candidates"][BASE]
    best, best_score = None, -math.inf
    for method in CANDIDATES:
        c = result["candidates"][method]
        c["qualifies"] = (c["teacher_forced_vs_window16"] <= 1.002
                          and c["greedy_identical_tokens"] >= base["greedy_identical_tokens"]
                          and c["t1_identical_tokens"] >= base["t1_identical_tokens"])
        c["score"] = (c["greedy_identical_tokens"] / base["greedy_identical_tokens"]
                      + c["t1_identical_tokens"] / base["t1_identical_tokens"])
        if c["qualifies"] and c["score"] > best_score:
            best, best_score = method, c["score"]
    result["chosen"] = best or BASE
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:5])
