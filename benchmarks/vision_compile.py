"""Does token merging still pay under ``torch.compile``? Patched vs unpatched ViT, eager and compiled.

    python benchmarks/vision_compile.py [--r 48] [--rounds 10] [--threads 2] [--json results/vision_compile.json]

The shipped Fashion-MNIST ViT on a batch of test images: the unpatched model, QuickMerge++ and ToMe-style at
constant r, each eager and compiled (inductor, the default backend; one compiled copy per setting, so each keeps
its own graphs). A patched model compiles whole (the hooks trace into the graph, no graph break) and recompiles
when the handle's settings change. All six are timed in the same rounds, the order rotating each round; medians,
speed-ups against the eager unpatched model and, for the compiled ones, against the compiled unpatched model. The
compiled outputs are checked against the eager ones (same settings) on the timing batch.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, default=48, help="tokens merged per block (48: 2x the unpatched model, eager)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    images, _ = load_fashion_mnist("test")
    batch = normalize(images[: args.batch])
    base = load_fashion_vit().eval()
    settings = {"none": None, "quickmerge": "quickmerge", "tome": "tome"}
    runs: dict[str, Callable[[], torch.Tensor]] = {}
    compile_s: dict[str, float] = {}
    max_abs_diff: dict[str, float] = {}
    models = {}
    for name, method in settings.items():  # every model patched before anything compiles (no cache reset later)
        for compiled in (False, True):
            models[name, compiled] = copy.deepcopy(base)
            if method is not None:
                patch(models[name, compiled], r=args.r, method=method)  # stays patched for the whole run
    for name in settings:
        for compiled in (False, True):
            model = models[name, compiled]
            fn = torch.compile(model) if compiled else model
            key = f"{name}, {'compiled' if compiled else 'eager'}"
            start = time.perf_counter()
            out = fn(batch)  # first call: compiles (and warms up the eager one)
            fn(batch)
            compile_s[key] = round(time.perf_counter() - start, 1)
            if compiled:
                max_abs_diff[key] = float((out - runs[f"{name}, eager"]()).abs().max())
            runs[key] = lambda fn=fn: fn(batch)
            print(key, "ready", compile_s[key], "s", flush=True)
    names = list(runs)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.rounds):
        for k in names[i % len(names):] + names[: i % len(names)]:
            times[k].append(_seconds(runs[k]))
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"setting": k, "median_s": round(median[k], 4), "images_per_s": round(args.batch / median[k], 1),
             "speedup_vs_eager_unpatched": round(median["none, eager"] / median[k], 3),
             "speedup_vs_same_mode_unpatched": round(median[f"none, {k.split(', ')[1]}"] / median[k], 3),
             "first_two_calls_s": compile_s[k], "max_abs_diff_vs_eager": max_abs_diff.get(k)} for k in names]
    for row in rows:
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python benchmarks/vision_compile.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json" and v is not None),
                "r": args.r, "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
                "torch": torch.__version__, "platform": platform.platform(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
