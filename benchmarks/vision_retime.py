"""Time again, together, every setting of one or more ``quickmerge eval vision`` results (accuracies kept).

    python benchmarks/vision_retime.py results/vision_hs_schedules.json results/vision_hs_greedy.json \
        --rounds 15 --out docs/results/issue11/vision_hs_together    # .json and .png

Runs made with ``--timing paired`` (the protocol before stop 48) time each setting in rounds of its own, so
settings timed minutes apart see different machine states, and several runs cannot be put on one curve. This
times the settings of all the given runs in the same rotating rounds (``eval vision --timing together``'s
:func:`~quickmerge.eval.vision.time_settings_together`) on the same model, and writes their rows with the new
speed fields, each method's accuracy at ToMe-style's speed-ups, and the plot. Accuracies are not recomputed:
they do not depend on timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.report import write_report
from quickmerge.eval.timing import warn_if_stolen
from quickmerge.eval.vision import compare_at_tome_speeds, plot_vision_eval, time_settings_together
from quickmerge.eval.vision_cli import learned_saliency
from quickmerge.pretrained.fashion_vit import load_fashion_vit

TIMING_FIELDS = ("images_per_s", "unpatched_images_per_s", "speedup", "speedup_per_round", "seconds_per_round",
                 "unpatched_seconds_per_round", "timing_sub_batches", "timing_steal_share")
COMPARED = ("quickmerge", "quickmerge-entropy", "quickmerge-per-image")


def job_of(row: dict[str, Any], num_layers: int) -> tuple[str | None, Any, dict[str, Any]]:
    """The ``(method, r, settings)`` that produced an eval row (labelled rows are QuickMerge++ schedules)."""
    method = None if row["method"] == "none" else "quickmerge" if "label" in row["settings"] else row["method"]
    r = row["r"]
    if isinstance(r, list) and len(r) == 2 and num_layers != 2:
        r = tuple(r)  # ToMe's (r, inflect), stored as a list
    return method, r, row["settings"]


def merge_runs(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of every run, each setting once (the first run's row), timing fields dropped."""
    seen, rows = set(), []
    for result in results:
        for row in result["rows"]:
            key = json.dumps([row["method"], row["r"], row["settings"]], sort_keys=True)
            if key not in seen:
                seen.add(key)
                rows.append({k: v for k, v in row.items() if k not in TIMING_FIELDS})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="eval vision JSONs, all of the same checkpoint, images and batch")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="output prefix (.json and .png are added)")
    args = ap.parse_args()
    results = [json.loads(Path(path).read_text()) for path in args.results]
    same = {json.dumps([r["config"].get(k) for k in ("checkpoint", "images", "batch_size")]) for r in results}
    if len(same) != 1:
        raise SystemExit(f"the results differ in checkpoint, images or batch size: {sorted(same)}")
    config = results[0]["config"]
    torch.set_num_threads(args.threads)
    model = load_fashion_vit(config["checkpoint"]).eval()
    scorer = learned_saliency(config["checkpoint"], model)
    rows = merge_runs(results)
    images, _ = load_fashion_mnist("test")
    batch = normalize(images[: config["batch_size"]])
    jobs = [job_of(row, len(model.blocks)) for row in rows]
    timed = time_settings_together(model, jobs, batch, args.rounds, scorer=scorer)
    rows = [row | fields for row, fields in zip(rows, timed, strict=True)]
    out = {"rows": rows, "sources": args.results,
           **{f"{m.replace('-', '_')}_vs_tome": compare_at_tome_speeds(rows, m) for m in COMPARED},
           "quickmerge_entropy_vs_constant": compare_at_tome_speeds(rows, "quickmerge-entropy", "quickmerge"),
           "config": {"command": " ".join(sys.argv), "rounds": args.rounds, "threads": torch.get_num_threads(),
                      "batch_size": config["batch_size"], "checkpoint": config["checkpoint"],
                      "torch": torch.__version__, "platform": platform.platform()}}
    title = f"Fashion-MNIST ViT, {rows[0]['images']} test images, timed together ({args.rounds} rounds)"
    paths = write_report(out, args.out, lambda png: plot_vision_eval(rows, png, title, out))
    for row in rows:
        print(f"{row['method']:22s} {row['r']!s:28s} {100 * row['accuracy']:.2f}  {row['speedup']:.2f}x")
    warn_if_stolen(rows)
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
