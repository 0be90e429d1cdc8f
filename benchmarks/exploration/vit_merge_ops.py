"""The operators inside the merge step of the reference ViT: QuickMerge++'s default against ToMe-style, per forward.

    python benchmarks/exploration/vit_merge_ops.py --r 48 --forwards 4 --json docs/results/stop74/vit_merge_ops_r48.json
    python benchmarks/exploration/vit_merge_ops.py --scope forward --r 48 \
        --json docs/results/stop76/vit_forward_ops_r48.json

``torch.profiler`` over forwards of the shipped Fashion-MNIST ViT (batch 256 test images), each method patched at
the same r, twice each in the order ToMe-style, default, ToMe-style, default. Every profiled operator called inside
the merge step (``MergeHandle.merge``, labelled as ``benchmarks/merge_step_profile.py`` labels it) has its self time
summed (``--scope forward``: every operator of the forward, the merge step's among them, to see whether the
methods differ outside it); the report is milliseconds per forward, per operator and per run, and the whole forward.
Profiled forwards run slower than timed ones: compare operators, not totals with a timed run.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from merge_step_profile import FORWARD, labelled_pieces  # a sibling script

import quickmerge
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit

MERGE = "merge step (whole)"


def inside(event, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


@torch.inference_mode()
def operators(model: torch.nn.Module, x: torch.Tensor, method: str, r: int, forwards: int,
              scope: str = MERGE) -> dict[str, float]:
    """Self milliseconds per forward of each operator inside ``scope`` (a labelled piece), and the forward's total."""
    with quickmerge.patch(model, r=r, method=method):
        model(x)  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                with record_function(FORWARD):
                    model(x)
    totals: collections.Counter = collections.Counter()
    for event in prof.events():
        if event.name == FORWARD:
            totals[FORWARD] += event.cpu_time_total / 1e3 / forwards
        elif inside(event, scope):
            totals[event.name] += event.self_cpu_time_total / 1e3 / forwards
    return dict(totals)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=48)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--forwards", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scope", choices=("merge", "forward"), default="merge",
                    help="the operators summed: those inside the merge step (default) or the whole forward's")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    scope = MERGE if args.scope == "merge" else FORWARD
    torch.set_num_threads(args.threads)
    model = load_fashion_vit().eval()
    x = normalize(load_fashion_mnist("test")[0][: args.batch])
    runs = {}
    with labelled_pieces():
        for name, method in (("tome", "tome"), ("default", "quickmerge"), ("tome_2", "tome"),
                             ("default_2", "quickmerge")):
            runs[name] = operators(model, x, method, args.r, args.forwards, scope)
    names = sorted(set().union(*runs.values()) - {FORWARD}, key=lambda k: -runs["default"].get(k, 0.0))
    print(f"{'ms per forward':>40} " + " ".join(f"{n:>10}" for n in runs))
    for name in [FORWARD, *names]:
        print(f"{name:>40} " + " ".join(f"{runs[n].get(name, 0.0):10.2f}" for n in runs))
    merge_total = {n: sum(v for k, v in runs[n].items() if k != FORWARD) for n in runs}
    print(f"{args.scope + ', all operators':>40} " + " ".join(f"{merge_total[n]:10.2f}" for n in runs))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "args": vars(args), "cores": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
            "runs": runs, f"{'merge_step' if args.scope == 'merge' else 'forward'}_total_ms": merge_total}, indent=2))


if __name__ == "__main__":
    main()
