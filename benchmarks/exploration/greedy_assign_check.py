"""Greedy QuickMerge++ assignment against an earlier commit's: identical merges, and the time of each.

    python benchmarks/exploration/greedy_assign_check.py --against c9a764d [--cases 200] [--threads 2] [--out F.json]

Loads ``quickmerge/vision/token_merge.py`` as it was at ``--against`` (``git show``) next to the working tree's,
checks ``quickmerge_assign`` gives the same groups and removed tokens on random cases (both rules, a learned keep
score, fp32 / fp16 / bf16, duplicated tokens for ties; every 20th a batch of 64 images of 150-196 tokens, which
the current code matches in chunks), then times both at the reference ViT's first block (batch
256, 196 tokens; keys 32 wide, hidden states 128 wide; r = 144), alternating, medians of 9, for each similarity
and rule: the ``--against`` column splits the old cost between the states' width and the rule.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from quickmerge.vision.token_merge import quickmerge_assign


def load_at(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:quickmerge/vision/token_merge.py"], check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "token_merge.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("quickmerge.vision._token_merge_then", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", required=True, help="the commit whose quickmerge_assign is compared")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the counts and medians here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    then = load_at(args.against).quickmerge_assign
    g = torch.Generator().manual_seed(0)
    compared = differing = 0
    for case in range(args.cases):
        b, n, d = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 5), (4, 60), (2, 40)))
        if case % 20 == 19:  # batches the current code matches in several chunks
            b, n, d = 64, int(torch.randint(150, 197, (1,), generator=g)), (32, 128)[case % 40 // 20]
        r = int(torch.randint(1, n, (1,), generator=g))
        x = torch.randn(b, n, d, generator=g)
        if case % 3 == 0:
            x[:, 1::2] = x[:, ::2][:, : x[:, 1::2].shape[1]]  # exact duplicates: ties
        x = x.to((torch.float32, torch.float16, torch.bfloat16)[case % 3])
        saliency = torch.rand(b, n, generator=g).softmax(-1)
        keep = torch.randn(b, n, generator=g) if case % 4 == 1 else None
        for rule, weight in (("additive", 0.5), ("scaled", 0.125)):
            if rule == "scaled" and keep is not None:
                continue  # refused: a learned keep score goes with the additive rule
            a = then(x, saliency, r, weight, return_removed=True, keep_score=keep, rule=rule)
            b_ = quickmerge_assign(x, saliency, r, weight, return_removed=True, keep_score=keep, rule=rule)
            compared += 1
            differing += not (torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1]))
    print(f"{compared} cases, {differing} with different merges")
    summary = {"command": " ".join(sys.argv), "threads": args.threads, "cases": compared, "differing": differing,
               "median_ms": {}}
    torch.manual_seed(0)
    saliency = torch.rand(256, 196).softmax(-1)
    inputs = {"keys": torch.randn(256, 196, 32), "hidden": torch.randn(256, 196, 128)}
    weights = {"additive": 0.5, "scaled": 0.125}
    for similarity, rule in (("keys", "additive"), ("keys", "scaled"), ("hidden", "additive"), ("hidden", "scaled")):
        weight = weights[rule]
        times = {"then": [], "now": []}
        for _ in range(10):
            for name, fn in (("then", then), ("now", quickmerge_assign)):
                start = time.perf_counter()
                fn(inputs[similarity], saliency, 144, weight, rule=rule)
                times[name].append(time.perf_counter() - start)
        then_ms, now_ms = (1e3 * statistics.median(times[k][1:]) for k in ("then", "now"))
        print(f"{similarity} + {rule}: {args.against} {then_ms:.1f} ms, now {now_ms:.1f} ms ({then_ms / now_ms:.2f}x)")
        summary["median_ms"][f"{similarity} + {rule}"] = {args.against: then_ms, "now": now_ms}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
