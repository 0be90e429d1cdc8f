"""The converted reference ViT's forwards against timm's, back to back: how much slower or faster is the other family's
path, unpatched and patched, and so how its speed-ups compare (stop 79).

    python benchmarks/exploration/converted_pairs.py [--family hf-vit] [--r 16 48] [--pairs 40] [--json OUT]

``converted_vit.py`` times each setting once per round, rounds minutes apart, and reads speed-ups against each
family's own unpatched model: the machine's drift between those forwards (the same unpatched forward took 1.6-2.6 s
in stop 78's run) is in every ratio. Here each pair is the two families' forward of the same 256 test images at the
same setting, back to back (which goes first alternates); per setting the median of other / timm time over the pairs
with a bootstrap 95% interval, and the other family's speed-up relative to timm's (unpatched ratio over patched
ratio; below 1: its patched path gains less), with an interval from resampling both settings' pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for converted_vit

from converted_vit import CONVERTERS, logits

import quickmerge
from quickmerge.cli_types import positive_int
from quickmerge.data import fashion_mnist as fm
from quickmerge.eval.timing import cpu_counters, steal_share
from quickmerge.pretrained.fashion_vit import load_fashion_vit


def _versions(family: str) -> dict[str, str]:
    """The converted family's library version (the layer layout of transformers' ViT depends on it)."""
    name = "torchvision" if family == "torchvision" else "transformers"
    return {name: __import__(name).__version__}


def seconds(model: torch.nn.Module, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    logits(model, batch)
    return time.perf_counter() - start


def bootstrap_median(values: list[float], draws: int, gen: torch.Generator) -> tuple[float, float]:
    """95% interval of the median of ``values`` (percentiles of ``draws`` resamples)."""
    x = torch.tensor(values, dtype=torch.float64)
    picks = torch.randint(len(x), (draws, len(x)), generator=gen)
    medians = x[picks].median(dim=1).values
    return float(medians.quantile(0.025)), float(medians.quantile(0.975))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=tuple(CONVERTERS), default="hf-vit")
    ap.add_argument("--r", type=positive_int, nargs="+", default=[16, 48])
    ap.add_argument("--pairs", type=positive_int, default=40)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images, _ = fm.load_fashion_mnist("test")
    batch = fm.normalize(images[:256])
    timm_model = load_fashion_vit()
    models = {"timm": timm_model, args.family: CONVERTERS[args.family](timm_model)}
    gen = torch.Generator().manual_seed(0)
    settings = [(None, 0)] + [(m, r) for r in args.r for m in ("quickmerge", "tome")]
    ratios: dict[str, list[float]] = {}
    before = cpu_counters()
    for method, r in settings:
        key = f"{method or 'none'}@{r}"
        handles = [quickmerge.patch(m, r=r, method=method) for m in models.values()] if method else []
        try:
            for model in models.values():
                logits(model, batch)  # warm-up at this setting
            pairs = []
            for k in range(args.pairs):
                order = list(models) if k % 2 == 0 else list(reversed(models))
                t = {name: seconds(models[name], batch) for name in order}
                pairs.append(t[args.family] / t["timm"])
            ratios[key] = pairs
        finally:
            for model in models.values() if handles else ():
                quickmerge.unpatch(model)
        low, high = bootstrap_median(pairs, 2000, gen)
        print(f"{key:>16}: {args.family} / timm time {statistics.median(pairs):.3f} [{low:.3f}, {high:.3f}]",
              flush=True)
    steal = steal_share(before, cpu_counters())
    rows = []
    base = torch.tensor(ratios["none@0"], dtype=torch.float64)
    for key, pairs in ratios.items():
        row = {"setting": key, "time_ratio": statistics.median(pairs),
               "time_ratio_ci": bootstrap_median(pairs, 2000, gen)}
        if key != "none@0":
            x = torch.tensor(pairs, dtype=torch.float64)
            draws = [float(base[torch.randint(len(base), (len(base),), generator=gen)].median()
                           / x[torch.randint(len(x), (len(x),), generator=gen)].median()) for _ in range(2000)]
            d = torch.tensor(draws)
            row["relative_speedup"] = statistics.median(ratios["none@0"]) / statistics.median(pairs)
            row["relative_speedup_ci"] = (float(d.quantile(0.025)), float(d.quantile(0.975)))
            print(f"{key:>16}: {args.family} speed-up / timm's {row['relative_speedup']:.3f} "
                  f"[{row['relative_speedup_ci'][0]:.3f}, {row['relative_speedup_ci'][1]:.3f}]")
        rows.append(row)
    print(f"steal over the run: {steal}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python benchmarks/exploration/converted_pairs.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads",
            "torch": torch.__version__, **_versions(args.family), "steal_share": steal, "rows": rows,
            "ratios_per_pair": ratios}, indent=1))


if __name__ == "__main__":
    main()
