"""Speed and fidelity of the core merge, measured side by side in one process.

Usage:  python benchmarks/core_speed.py [--repeats 7] [--out results/core_speed]

Times, on 2 threads and interleaved (each repeat runs every method once), at
(B, N, D, K) = (2, 100, 512, 20), (8, 1024, 768, 256), (1, 4096, 768, 1024),
(1, 16384, 768, 4096):
  (a)  QuickMergePP(num_layers=12) forward in eval mode: saliency from X,
       selection, merging and both losses; (a') the same without losses;
  (b)  the spec's algorithm done as the public reference code does it
       (baselines/reference.py), where it finishes in reasonable time;
  (c)  ToMe-style bipartite soft matching down to the same K;
  (d)  QuickMerge++'s merge step alone (selection + clustering + means) given saliency.
Peak memory of (a) at the largest shape is measured in a fresh subprocess.
Fidelity: relative reconstruction error after unmerging real MiniLM token
states of 40 Wikipedia windows at K = N/4, weighted uniformly, by QuickMerge++'s merge
mass, and by the attention each token receives in the last layer (neutral: chosen by no method).
Writes ``<out>.json`` and ``<out>.png`` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from quickmerge import DifferentiableTokenMerging, QuickMergePP
from quickmerge.baselines import tome_merge, uniform_pool
from quickmerge.baselines.reference import reference_quickmerge
from quickmerge.merging import merge_mass

SHAPES = [(2, 100, 512, 20), (8, 1024, 768, 256), (1, 4096, 768, 1024), (1, 16384, 768, 4096)]
# The reference clusters with O(N^2) memory and time; at N=16384 it needs a 2 GB distance
# matrix per sample and many minutes, so it is run up to N=4096 (once there).
REFERENCE_MAX_N = 4096


def _timer(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_shape(shape: tuple[int, int, int, int], repeats: int) -> dict[str, float]:
    b, n, d, k = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, d, generator=gen)
    qm = QuickMergePP(d, num_layers=12).eval()
    merger = DifferentiableTokenMerging().eval()
    with torch.no_grad():
        saliency = qm.saliency(x)
    methods = {
        "a_quickmerge_forward": lambda: qm(x, k),
        "a_quickmerge_compress": lambda: qm.compress(x, k),
        "c_tome": lambda: tome_merge(x, k),
        "d_merge_step": lambda: merger(x, saliency, k),
    }
    if n <= REFERENCE_MAX_N:
        methods["b_reference"] = lambda: reference_quickmerge(x, k, num_layers=12)
    times: dict[str, list[float]] = {name: [] for name in methods}
    with torch.no_grad():
        for fn in methods.values():  # warm-up
            if fn is not methods.get("b_reference"):
                fn()
        for rep in range(repeats):
            for name, fn in methods.items():
                if name == "b_reference" and n > 1024 and rep > 0:
                    continue  # one run is enough for a many-second baseline
                times[name].append(_timer(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_memory_gb(shape: tuple[int, int, int, int]) -> dict[str, float]:
    """Peak resident memory of a fresh process during one call of (a), from /proc (Linux).

    The peak counter is reset just before the call, so the figure is the process's
    largest footprint during the call: torch, the model and X included.
    """
    code = (
        "import torch; from quickmerge import QuickMergePP; torch.set_num_threads(2)\n"
        f"b, n, d, k = {shape}\n"
        "x = torch.randn(b, n, d); qm = QuickMergePP(d, num_layers=12).eval()\n"
        "def status(key):\n"
        "    line = [l for l in open('/proc/self/status') if l.startswith(key)][0]\n"
        "    return int(line.split()[1])\n"
        "before = status('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "with torch.no_grad():\n"
        "    qm(x, k)\n"
        "print(before, status('VmHWM'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    before, peak = (int(v) / 1024**2 for v in out)  # KiB -> GiB
    return {"peak_rss_gb": peak, "rss_before_call_gb": before}


def fidelity(num_windows: int = 40, window: int = 254) -> dict[str, dict[str, float]]:
    """Relative reconstruction errors on real MiniLM states of Wikipedia windows at K = N/4."""
    from quickmerge.data import wikipedia_articles
    from quickmerge.demos.encoder_token_groups import relative_error
    from quickmerge.pretrained.encoder import encode, load_encoder

    model, tok = load_encoder()
    variants = {
        "quickmerge": QuickMergePP(384, num_layers=6).eval(),
        "quickmerge_causal": QuickMergePP(384, num_layers=6, causal=True).eval(),
        "quickmerge_high_entropy": QuickMergePP(384, num_layers=6, salient="high_entropy").eval(),
        "quickmerge_x_only": QuickMergePP(384, num_layers=6).eval(),
    }
    errors: dict[str, list[tuple[float, float]]] = {}
    for article in wikipedia_articles()[:num_windows]:
        ids = tok(article.text, add_special_tokens=False)["input_ids"][:window]
        enc = encode(model, tok, tok.decode(ids))
        x, n = enc.hidden, enc.hidden.shape[1]
        k = n // 4
        with torch.no_grad():
            ref, s = variants["quickmerge"].compress(x, k, attentions=enc.attentions)
            mass = merge_mass(ref.mask, s, variants["quickmerge"].merger.epsilon)
            # a neutral weight, chosen by no method: the attention each token receives in the model's last layer
            received = enc.attentions[-1].mean(dim=1).sum(dim=1)  # [1, N]
            recon = {}
            for name, qm in variants.items():
                attn = None if name == "quickmerge_x_only" else enc.attentions
                recon[name] = qm.compress(x, k, attentions=attn)[0].unmerge()
        for name, fn in [("tome", tome_merge), ("uniform_pool", uniform_pool)]:
            merged, assignment, _ = fn(x, k)
            recon[name] = merged.gather(1, assignment[..., None].expand(-1, -1, x.shape[-1]))
        for name, approx in recon.items():
            errors.setdefault(name, []).append(
                (relative_error(x, approx), relative_error(x, approx, mass), relative_error(x, approx, received))
            )
    return {
        name: {
            "error": statistics.mean(e[0] for e in v),
            "mass_weighted_error": statistics.mean(e[1] for e in v),
            "attention_weighted_error": statistics.mean(e[2] for e in v),
        }
        for name, v in errors.items()
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(tuple(r["shape"])) for r in results["speed"]]
    names = ["b_reference", "a_quickmerge_forward", "a_quickmerge_compress", "d_merge_step", "c_tome"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.16
    for i, name in enumerate(names):
        vals = [r["seconds"].get(name, float("nan")) for r in results["speed"]]
        ax.bar([j + (i - 2) * width for j in range(len(labels))], vals, width, label=name)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("(B, N, D, K)")
    ax.set_ylabel("seconds (median, 2 threads)")
    ax.set_title("QuickMerge++ core: time per call")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="results/core_speed")
    parser.add_argument("--skip-fidelity", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from tqdm import tqdm

    results = {
        "machine": {"cpu_threads": torch.get_num_threads(), "cores": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "speed": [],
    }
    for shape in tqdm(SHAPES, desc="shapes"):
        secs = time_shape(shape, args.repeats)
        results["speed"].append({"shape": list(shape), "seconds": secs})
    results["peak_memory"] = {"shape": list(SHAPES[-1]), **peak_memory_gb(SHAPES[-1])}
    if not args.skip_fidelity:
        results["fidelity"] = fidelity()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, out.with_suffix(".png"))

    print("\n| (B, N, D, K) | (b) reference | (a) forward | (a') compress | (d) merge step | (c) ToMe | b/a | d/c |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results["speed"]:
        s = row["seconds"]
        ref = s.get("b_reference")
        ba = f"{ref / s['a_quickmerge_forward']:.1f}x" if ref else "n/a"
        print(
            f"| {tuple(row['shape'])} | {f'{ref:.3f}' if ref else 'not run'} | {s['a_quickmerge_forward']:.4f} | "
            f"{s['a_quickmerge_compress']:.4f} | {s['d_merge_step']:.4f} | {s['c_tome']:.4f} | {ba} | "
            f"{s['d_merge_step'] / s['c_tome']:.2f} |"
        )
    pm = results["peak_memory"]
    print(
        f"\npeak RSS of a process running (a) at {tuple(pm['shape'])}: {pm['peak_rss_gb']:.2f} GB "
        f"({pm['rss_before_call_gb']:.2f} GB before the call)"
    )
    if "fidelity" in results:
        print("\n| method | uniform weights | QuickMerge++ mass | last-layer attention received |\n|---|---|---|---|")
        for name, v in results["fidelity"].items():
            errors = (v["error"], v["mass_weighted_error"], v["attention_weighted_error"])
            print(f"| {name} | " + " | ".join(f"{e:.3f}" for e in errors) + " |")


if __name__ == "__main__":
    main()
