"""Merge-aware fine-tuning, paired: each fine-tuned ViT with its own merging vs the reference ViT.

Every model is scored on the same 10,000 Fashion-MNIST test images, so the comparisons are
paired per image (95% bootstrap intervals of accuracy differences, in points), at each --r and
at one speed-up (``--at``, default 2x: each curve's per-image hits interpolated linearly between
its two bracketing r). Speed-ups are not measured here: a fine-tuned model has the reference's
architecture, so at equal r it runs at the speed-up `quickmerge eval vision` measured for that
method and r in the ``--speedups`` run (a learned saliency makes the merge step dearer:
BENCHMARKS.md). A checkpoint holding ``token_scorer.safetensors`` (a ``--learned-saliency``
fine-tune) merges with its learned saliency under QuickMerge++. QuickMerge++ merges every model with the
matching the ``--quickmerge`` checkpoint was fine-tuned with (``train vision --similarity/--saliency-rule``).

    python benchmarks/vision_finetune.py --quickmerge results/ft_qm_r40 --tome results/ft_tome_r40 \
        --control results/ft_none --r 40 48 --speedups results/vision_full.json --out docs/results/issue11/finetune_r40

The per-image hits can be computed on another machine first (``--device cuda --hits H.json``,
no ``--speedups``: only the hits are written) and the report made later from them
(``--hits H.json --speedups ...``): the checkpoints are then not read again.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, sha256
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.eval.vision import interpolated_hits
from quickmerge.pretrained.fashion_vit import ASSET_DIR, fine_tuned_merging, load_fashion_vit
from quickmerge.vision import TokenScorer, patch
from quickmerge.vision.patch import non_default_matching, recorded_matching
from quickmerge.vision.token_scorer import FILENAME as SCORER_FILE
from quickmerge.vision.train import correct_per_image as hits_per_image


@torch.inference_mode()
def correct_per_image(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                      method: str | None, r: int, scorer: TokenScorer | None = None,
                      options: dict | None = None) -> list[float]:
    """1.0 / 0.0 per test image: top-1 of ``model`` merging with ``method`` at ``r`` (None: unpatched), with a
    fine-tune's learned ``scorer`` and QuickMerge++'s ``options`` (patch settings) under QuickMerge++."""
    scorer, options = (scorer, options or {}) if method == "quickmerge" else (None, {})
    handle = patch(model, r=r, method=method, scorer=scorer, **options) if method is not None else None
    try:
        return hits_per_image(model, images, labels).double().tolist()
    finally:
        if handle is not None:
            handle.remove()


CURVES = {  # name: (model, merging at inference)
    "reference + quickmerge": ("reference", "quickmerge"),
    "reference + tome": ("reference", "tome"),
    "fine-tuned quickmerge + quickmerge": ("fine-tuned quickmerge", "quickmerge"),
    "fine-tuned tome + tome": ("fine-tuned tome", "tome"),
    "fine-tuned without merging + quickmerge": ("fine-tuned without merging", "quickmerge"),
    "fine-tuned without merging + tome": ("fine-tuned without merging", "tome"),
}
PAIRS = [("fine-tuned quickmerge + quickmerge", "reference, unpatched"),
         ("fine-tuned tome + tome", "reference, unpatched"),
         ("fine-tuned quickmerge + quickmerge", "fine-tuned tome + tome"),
         ("reference + quickmerge", "reference + tome"),
         ("fine-tuned quickmerge + quickmerge", "reference + quickmerge"),
         ("fine-tuned tome + tome", "reference + tome"),
         ("fine-tuned quickmerge + quickmerge", "fine-tuned without merging, unpatched"),
         ("fine-tuned tome + tome", "fine-tuned without merging, unpatched"),
         ("fine-tuned quickmerge + quickmerge", "fine-tuned without merging + quickmerge"),
         ("fine-tuned tome + tome", "fine-tuned without merging + tome")]


def at_speedup(hits: dict[int, list[float]], speedups: dict[int, float], target: float) -> list[float] | None:
    """Per-image hits linearly interpolated to ``target`` speed-up between the two bracketing r (None: outside):
    :func:`~quickmerge.eval.vision.interpolated_hits`, as ``eval vision`` interpolates."""
    found = interpolated_hits([(speedups[r], torch.tensor(h, dtype=torch.float64)) for r, h in sorted(hits.items())
                               if speedups.get(r) is not None], target)
    return None if found is None else found[0].tolist()


def compared_hits(unpatched: dict[str, list[float]], curves: dict[str, dict[int, list[float]]],
                  speedups: dict[str, dict[int, float | None]], at: float) -> dict[str, dict[str, list[float]]]:
    """Per-image hits of every model and curve at each place compared: ``"r=R"`` for each r, and ``"{at}x"``."""
    places = {f"r={r}": unpatched | {name: curve[r] for name, curve in curves.items()}
              for r in next(iter(curves.values()))}
    places[f"{at}x"] = dict(unpatched)
    for name, curve in curves.items():
        if (hits := at_speedup(curve, speedups[CURVES[name][1]], at)) is not None:
            places[f"{at}x"][name] = hits
    return places


def report_hits(report: dict) -> dict[str, dict[str, list[float]]]:
    """:func:`compared_hits` of a saved report, from the per-image hits file it names (``hits_from``)."""
    if report.get("hits_from") is None or not Path(report["hits_from"]).exists():
        raise FileNotFoundError(f"the report's per-image hits are not here: {report.get('hits_from')!r}")
    saved = json.loads(Path(report["hits_from"]).read_text())
    curves = {name: {int(r): hits for r, hits in curve.items()} for name, curve in saved["curves"].items()}
    speedups = {m: {int(r): s for r, s in v.items()} for m, v in report["speedups"].items()}
    return compared_hits(saved["unpatched"], curves, speedups, report["at"])


def compare(hits: dict[str, list[float]], a: str, b: str) -> dict:
    """Paired difference a - b in points with its 95% bootstrap interval, and the images where they disagree."""
    diff, low, high = bootstrap_difference(hits[a], hits[b])
    return {"a": a, "b": b, "difference_pt": 100 * diff, "low_pt": 100 * low, "high_pt": 100 * high,
            "a_better_on": sum(x > y for x, y in zip(hits[a], hits[b], strict=True)),
            "b_better_on": sum(x < y for x, y in zip(hits[a], hits[b], strict=True))}


def quickmerge_options(checkpoint: str) -> dict:
    """The patch settings a QuickMerge++ fine-tune trained with, where they differ from the defaults."""
    return non_default_matching(recorded_matching(fine_tuned_merging(checkpoint) or {}))


def per_image_hits(args: argparse.Namespace, checkpoints: dict[str, str]
                   ) -> tuple[dict[str, list[float]], dict[str, dict[int, list[float]]], int]:
    """(unpatched hits per model, hits per curve and r, number of images): from ``--hits`` or computed."""
    # the weights themselves (the reference is the shipped model), so hits of a retrained checkpoint are never reused
    weights = {"reference": ASSET_DIR, **{k: Path(v) for k, v in checkpoints.items()}}
    identity = {"checkpoints": checkpoints, "r": args.r,
                "weights_sha256": {k: sha256(d / "model.safetensors") for k, d in weights.items()}}
    learned = {k: d for k, d in weights.items() if TokenScorer.saved_in(d)}  # --learned-saliency fine-tunes
    if learned:
        identity["scorer_sha256"] = {k: sha256(d / SCORER_FILE) for k, d in learned.items()}
    options = quickmerge_options(checkpoints["quickmerge"])
    if options:
        identity["quickmerge_options"] = options
    if args.hits is not None and Path(args.hits).exists():
        saved = json.loads(Path(args.hits).read_text())
        if saved["identity"] != identity:
            raise SystemExit(f"--hits {args.hits} holds other checkpoints, weights or r: {saved['identity']}")
        curves = {name: {int(r): hits for r, hits in curve.items()} for name, curve in saved["curves"].items()}
        return saved["unpatched"], curves, len(next(iter(saved["unpatched"].values())))
    images, labels = load_fashion_mnist("test")
    names = {"reference": "reference", "quickmerge": "fine-tuned quickmerge", "tome": "fine-tuned tome",
             "control": "fine-tuned without merging"}
    models = {names[k]: load_fashion_vit(d if k != "reference" else None).to(args.device) for k, d in weights.items()}
    scorers = {names[k]: TokenScorer.load(d) for k, d in learned.items()}
    sha = {names[k]: (v, identity.get("scorer_sha256", {}).get(k)) for k, v in identity["weights_sha256"].items()}
    scored: dict[tuple, list[float]] = {}  # the same weights (e.g. --control the reference) are scored once

    def hits_of(name: str, method: str | None, r: int) -> list[float]:
        key = (sha[name], method, r)
        if key not in scored:
            scored[key] = correct_per_image(models[name], images, labels, method=method, r=r,
                                            scorer=scorers.get(name), options=options)
        return scored[key]

    unpatched = {f"{name}, unpatched": hits_of(name, None, 0) for name in models}
    curves = {name: {r: hits_of(m, method, r) for r in args.r} for name, (m, method) in CURVES.items()}
    if args.hits is not None:
        config = {"threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
                  "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device}
        Path(args.hits).write_text(json.dumps({"identity": identity, "config": config, "unpatched": unpatched,
                                               "curves": curves}))
        print(f"wrote {args.hits}")
    return unpatched, curves, len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quickmerge", required=True, help="checkpoint fine-tuned with QuickMerge++ merging")
    ap.add_argument("--tome", required=True, help="checkpoint fine-tuned with ToMe-style merging")
    ap.add_argument("--control", required=True, help="checkpoint fine-tuned the same way without merging (r = 0): "
                    "how much of a fine-tuned model's accuracy the extra epoch gives by itself")
    ap.add_argument("--r", type=int, nargs="+", required=True, help="tokens merged per block at inference")
    ap.add_argument("--speedups", default=None, help="JSON of `quickmerge eval vision` measuring every --r "
                    "(without it only --hits is written)")
    ap.add_argument("--hits", default=None, help="per-image hits: read from this JSON when it exists (for the same "
                    "checkpoints and --r), else computed and written to it")
    ap.add_argument("--device", default="cpu", help="where the models run when the hits are computed")
    ap.add_argument("--at", type=float, default=2.0, help="speed-up at which the curves are compared")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="output prefix (.json, .png); needed with --speedups")
    args = ap.parse_args()
    if args.speedups is None and args.hits is None:
        ap.error("give --speedups (the report) or --hits (where to write the per-image hits), or both")
    if args.speedups is not None and args.out is None:
        ap.error("--speedups needs --out (the report's prefix)")
    torch.set_num_threads(args.threads)
    checkpoints = {"quickmerge": args.quickmerge, "tome": args.tome, "control": args.control}
    unpatched, curves, n_images = per_image_hits(args, checkpoints)
    if args.speedups is None:
        return
    rows = json.loads(Path(args.speedups).read_text())["rows"]
    speedups = {m: {r: next((x["speedup"] for x in rows if x["method"] == m and x["r"] == r), None) for r in args.r}
                for m in ("quickmerge", "tome")}
    results: dict = {"r": args.r, "images": n_images, "speedups_from": args.speedups, "speedups": speedups,
                     "checkpoints": checkpoints, "quickmerge_options": quickmerge_options(args.quickmerge),
                     "hits_from": args.hits,
                     "accuracy": {}, "paired": {}, "at": args.at}
    for name, hits in unpatched.items():
        results["accuracy"][name] = dict(zip(("accuracy", "low", "high"), bootstrap_mean(hits), strict=True))
    for where, hits in compared_hits(unpatched, curves, speedups, args.at).items():
        suffix = f" at {where}" if where.endswith("x") else f" {where}"
        results["accuracy"] |= {f"{name}{suffix}": dict(zip(("accuracy", "low", "high"), bootstrap_mean(h),
                                                            strict=True)) for name, h in hits.items() if name in curves}
        results["paired"][where] = [compare(hits, a, b) for a, b in PAIRS if a in hits and b in hits]
    if args.hits is None:
        results["config"] = {"threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
                             "device": args.device}
    else:
        results["config"] = json.loads(Path(args.hits).read_text())["config"]
    Path(args.out + ".json").write_text(json.dumps(results, indent=2))
    for name, acc in results["accuracy"].items():
        print(f"{name:52s} {100 * acc['accuracy']:.2f} [{100 * acc['low']:.2f}, {100 * acc['high']:.2f}]")
    for where, pairs in results["paired"].items():
        for p in pairs:
            print(f"{where}: {p['a']} - {p['b']}: {p['difference_pt']:+.2f} pt [{p['low_pt']:+.2f}, "
                  f"{p['high_pt']:+.2f}] ({p['a_better_on']} vs {p['b_better_on']} images)")
    plot(results, rows, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")


def plot(results: dict, rows: list[dict], path: str) -> None:
    """Accuracy vs speed-up: the off-the-shelf curves of the eval run plus the fine-tuned ones."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = {"quickmerge": ("QuickMerge++", "C3", "o"), "tome": ("ToMe-style", "C0", "s")}
    for method, (label, colour, marker) in names.items():
        pts = sorted((x["speedup"], 100 * x["accuracy"]) for x in rows if x["method"] == method)
        ax.plot(*zip(*pts, strict=True), color=colour, marker=marker, alpha=0.45, ls="--",
                label=f"{label}, off the shelf")
        tuned = sorted((results["speedups"][method][r],
                        100 * results["accuracy"][f"fine-tuned {method} + {method} r={r}"]["accuracy"])
                       for r in results["r"])
        ax.plot(*zip(*tuned, strict=True), color=colour, marker="*", markersize=12,
                label=f"{label}, fine-tuned with it (r={results['r'][0]})")
    base = 100 * results["accuracy"]["reference, unpatched"]["accuracy"]
    control = 100 * results["accuracy"]["fine-tuned without merging, unpatched"]["accuracy"]
    ax.axhline(base, color="k", lw=0.8, ls="--", label=f"reference, unpatched {base:.2f}%")
    ax.axhline(base - 0.3, color="k", lw=0.6, ls=":", label="reference - 0.3 pt")
    ax.axhline(control, color="C2", lw=0.8, ls="--", label=f"fine-tuned without merging, unpatched {control:.2f}%")
    ax.axvline(results["at"], color="k", lw=0.6, ls=":")
    ax.set_xlabel("throughput / unpatched throughput (same run)")
    ax.set_ylabel("top-1 accuracy (%), 10,000 test images")
    ax.set_title("Merge-aware fine-tuning on the Fashion-MNIST ViT")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
