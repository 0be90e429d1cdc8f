"""Wall clock or the process's CPU time: which measures a merged forward's cost with less scatter on a shared host.

    python benchmarks/exploration/cpu_clock.py --rounds 20 --json docs/results/stop76/cpu_clock.json
    python benchmarks/exploration/cpu_clock.py --report docs/results/stop76/cpu_clock.json   # its table again

The reference ViT (batch 256 test images, 2 threads): the unpatched model, ToMe-style and QuickMerge++'s default at
each ``--r``, each on a copy of its own, timed in rounds whose order rotates as ``eval vision --timing together``
does (each setting, then the unpatched reference right after it). Every call is read on two clocks at once:
``time.perf_counter()`` (wall) and ``time.process_time()`` (CPU seconds of all the process's threads; time a
hypervisor gives to other guests, steal, is not counted). Per clock: each setting's speed-up (median over rounds of
reference / setting), the relative interquartile range of its per-round ratios, and the unpatched model against
itself; with the steal ``/proc/stat`` counted over the run and the CPU seconds per wall second. Also (added after
the first run, which showed the host's speed varying twofold within it) the ratio of the fastest rounds, the
reference's minimum over the setting's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from pooled_speedup import relative_iqr  # a sibling script (this directory is on sys.path when run)
from tqdm import tqdm

import quickmerge
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.timing import cpu_counters, steal_share
from quickmerge.pretrained.fashion_vit import load_fashion_vit

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn) -> dict[str, float]:
    """Seconds of ``fn()`` on every clock, read together."""
    start = {name: read() for name, read in CLOCKS.items()}
    fn()
    return {name: read() - start[name] for name, read in CLOCKS.items()}


def summarise(result: dict) -> None:
    """Fill in and print the estimators of ``result`` from its rounds' seconds (a run's or a saved JSON's)."""
    for row in result["settings"].values():
        for clock in CLOCKS:
            o, b = row[clock]["seconds_per_round"], row[clock]["reference_seconds_per_round"]
            ratios = [bb / oo for oo, bb in zip(o, b, strict=True)]
            row[clock].update(speedup=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                              speedup_of_minima=min(b) / min(o), relative_iqr=relative_iqr(ratios))
        row["cpu_per_wall"] = statistics.median(
            c / w for c, w in zip(row["cpu"]["seconds_per_round"], row["wall"]["seconds_per_round"], strict=True))
    for clock in CLOCKS:
        result[f"{clock}_median_relative_iqr"] = statistics.median(
            row[clock]["relative_iqr"] for row in result["settings"].values())
    head = " ".join(f"{c + ' speed-up':>14} {c + ' range':>14} {c + ' rel IQR':>12} {'of minima':>10}" for c in CLOCKS)
    print(f"{'setting':>20} {head}  cpu/wall")
    for name, row in result["settings"].items():
        print(f"{name:>20} " + " ".join(
            f"{row[c]['speedup']:13.3f}x {row[c]['ratio_min']:6.3f}-{row[c]['ratio_max']:6.3f}"
            f" {row[c]['relative_iqr']:12.3f} {row[c]['speedup_of_minima']:9.3f}x" for c in CLOCKS)
            + f"  {row['cpu_per_wall']:.2f}")
    for clock in CLOCKS:  # the host's own drift: one model, the same batch, every round of the run
        seconds = [t for row in result["settings"].values() for t in row[clock]["reference_seconds_per_round"]]
        result[f"{clock}_reference_seconds_range"] = [min(seconds), statistics.median(seconds), max(seconds)]
        print(f"the unpatched reference, {clock} seconds over the run: min {min(seconds):.3f}, "
              f"median {statistics.median(seconds):.3f}, max {max(seconds):.3f}")
    print("median relative IQR: " + ", ".join(f"{c} {result[f'{c}_median_relative_iqr']:.3f}" for c in CLOCKS)
          + (f"; steal {result['steal_share']:.1%} of CPU time over the run" if "steal_share" in result else ""))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, nargs="+", default=[48, 64])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--report", default=None, metavar="JSON", help="print a saved run's estimators, run nothing")
    args = ap.parse_args()
    if args.report:
        summarise(json.loads(Path(args.report).read_text()))
        return
    if args.rounds < 4:
        ap.error(f"--rounds must be at least 4 (quartiles of the per-round ratios), got {args.rounds}")
    torch.set_num_threads(args.threads)
    model = load_fashion_vit().eval()
    batch = normalize(load_fashion_mnist("test")[0][: args.batch])
    reference = copy.deepcopy(model)
    jobs = [("unpatched", None, 0)] + [(f"{name} r={r}", method, r) for r in args.r
                                       for name, method in (("ToMe-style", "tome"), ("QuickMerge++", "quickmerge"))]
    models, handles = [], []
    for _, method, r in jobs:
        copy_ = copy.deepcopy(model)
        if method is not None:
            handles.append(quickmerge.patch(copy_, r=r, method=method))
        models.append(copy_)
    for m in models:  # warm-up
        m(batch)
        reference(batch)
    ours = [[] for _ in jobs]
    base = [[] for _ in jobs]
    before, started = cpu_counters(), time.perf_counter()
    for i in tqdm(range(args.rounds), desc="rounds", unit="round"):
        for k in [*range(i % len(jobs), len(jobs)), *range(i % len(jobs))]:
            ours[k].append(timed(lambda k=k: models[k](batch)))
            base[k].append(timed(lambda: reference(batch)))
    wall, after = time.perf_counter() - started, cpu_counters()
    for h in handles:
        h.remove()
    result = {"args": vars(args), "cores": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
              "wall_seconds": wall, "settings": {}}
    steal = steal_share(before, after)
    if steal is not None:
        result["steal_share"] = steal
    for (name, _, _), o, b in zip(jobs, ours, base, strict=True):
        result["settings"][name] = {clock: {"seconds_per_round": [oo[clock] for oo in o],
                                            "reference_seconds_per_round": [bb[clock] for bb in b]}
                                    for clock in CLOCKS}
    summarise(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
