"""A small VideoMAE classifier trained here on Moving Fashion-MNIST, then merged: QuickMerge++ vs ToMe-style.

No pretrained video transformer is obtainable here, so this trains one on real pixels: each clip is one
Fashion-MNIST item moving on a 64 x 64 black canvas for 8 frames (the Moving-MNIST procedure,
:func:`quickmerge.data.moving_fashion.moving_fashion_mnist`), labelled with the item's class. Training clips draw
items of the training split, test clips items of the test split (10,000 clips, seed 0, never drawn in training).
The model is Hugging Face's ``VideoMAEForVideoClassification`` (mean-pooled head, no class token), 6 layers 128
wide, 8 x 8 patches, tubelets of 2 frames: 256 tokens.

    python benchmarks/video_vit_fashion.py train --steps 1500 --out results/s67/videomae_fashion
    python benchmarks/video_vit_fashion.py eval results/s67/videomae_fashion --r 8 16 24 32 \
        --json results/s67/videomae_fashion_eval.json --png docs/img/video_vit_fashion.png
    python benchmarks/video_vit_fashion.py pool EVAL_SEED0.json EVAL_SEED1.json --json pooled.json
    python benchmarks/video_vit_fashion.py eval results/s67/videomae_fashion --r 32 --saliency-queries 4 8 16 32 \
        --json results/s70/seed0_queries.json

``eval``: top-1 and KL(unmerged || merged) per clip of the unpatched model and of ToMe-style and QuickMerge++ at each
r (the plain ``quickmerge`` rows: keys, additive saliency, 16 queries, ``patch``'s defaults of stops 67-71, given
explicitly), the paired differences QuickMerge++ minus ToMe-style with their 95% bootstrap intervals, and speed-ups
timed together in rotating rounds (``quickmerge.eval.vision.time_settings_together``); with ``--saliency-queries``,
QuickMerge++ at each count of saliency queries (``patch(saliency_queries=...)``; 16 is the plain row, the others are
also compared with it), with ``--hidden-scaled`` stop 47's matching, compared the same way.
``pool``: models of several training seeds, each clip set
scored by every model; at each r the per-clip difference averaged over the models (the clip sets one after
another), with its bootstrap interval over clips, and each model's own mean difference; the same for every other
QuickMerge++ variant all the evals share (another count of saliency queries, the mean query), against ToMe-style
and against the plain QuickMerge++ rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from quickmerge.cli_types import positive_int
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.data.moving_fashion import moving_fashion_mnist
from quickmerge.vision.patch import DEFAULT_SALIENCY_QUERIES as DEFAULT_QUERIES

FRAMES, CANVAS = 8, 64
MODEL_STYLES = ("o-", "s--", "^:", "D-.")  # one line style per model in the pooled plot


# QuickMerge++'s options an eval may vary, by their name in the hits keys, with the values of the plain
# ``quickmerge`` rows (patch()'s defaults of stops 67-71; passed to patch explicitly, so a row's meaning never follows
# a later default)
VARIANT_OPTIONS = {"saliency": ("saliency", "cls"), "queries": ("saliency_queries", DEFAULT_QUERIES),
                   "similarity": ("similarity", "keys"), "saliency_rule": ("saliency_rule", "additive")}
CHOSEN_MATCHING = {"similarity": "hidden", "saliency_rule": "scaled"}  # stop 47's rule (--hidden-scaled)


def variant_suffix(options: dict) -> str:
    """``""`` at the plain row's options, else ``"/queries=8"``, ``"/saliency=mean"``: the options that differ."""
    return "".join(f"/{name}={options[key]}" for name, (key, default) in VARIANT_OPTIONS.items()
                   if options.get(key, default) != default)


def parse_variant(suffix: str) -> dict:
    """The options of a :func:`variant_suffix`."""
    options = {}
    for part in suffix.strip("/").split("/"):
        name, value = part.split("=")
        key, default = VARIANT_OPTIONS[name]
        options[key] = type(default)(value)
    return options


def hits_key(method: str, r: int, options: dict | None = None) -> str:
    """The eval JSON's key of a setting's per-clip hits; QuickMerge++ at ``patch``'s defaults keeps the plain
    ``method@r`` of the evals made before its options varied."""
    return f"{method}@{r}" + variant_suffix(options or {})


def patch_options(method: str, options: dict) -> dict:
    """What ``patch`` is given for a row: QuickMerge++'s every option explicit (the plain row's values where the row
    names none), nothing for the other methods."""
    if method != "quickmerge":
        return {}
    return {key: options.get(key, default) for key, default in VARIANT_OPTIONS.values()}


def row_options(row: dict) -> dict:
    return {key: row[key] for key, _ in VARIANT_OPTIONS.values() if key in row}


def default_rows(rows: list[dict]) -> list[dict]:
    """The rows of ``patch``'s defaults: every method's, QuickMerge++'s at its default options only."""
    return [row for row in rows if not variant_suffix(row_options(row))]


def config():
    import transformers

    return transformers.VideoMAEConfig(image_size=CANVAS, patch_size=8, num_channels=1, num_frames=FRAMES,
                                       tubelet_size=2, hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                                       intermediate_size=512, num_labels=10, use_mean_pooling=True,
                                       attn_implementation="sdpa")


def clips(items: torch.Tensor, labels: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[count, FRAMES, 1, CANVAS, CANVAS]`` standardised pixels and the labels ``[count]`` of their items."""
    video, which = moving_fashion_mnist(items, count, frames=FRAMES, canvas=CANVAS, per_sequence=1, seed=seed,
                                        return_items=True)
    return normalize(video)[:, :, None], labels[which[:, 0]]


def train(args: argparse.Namespace) -> None:
    import transformers

    torch.manual_seed(args.seed)
    items, labels = load_fashion_mnist("train")
    model = transformers.VideoMAEForVideoClassification(config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = args.steps // 20

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    log, start = [], time.time()
    for step in range(args.steps):
        x, y = clips(items, labels, args.batch, seed=1_000_000 + args.seed * args.steps + step)
        loss = F.cross_entropy(model(pixel_values=x).logits, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "minutes": (time.time() - start) / 60})
            print(f"step {step}: loss {loss.item():.4f} ({log[-1]['minutes']:.1f} min)", flush=True)
    out = Path(args.out)
    model.eval().save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=2))


@torch.inference_mode()
def evaluate(args: argparse.Namespace) -> None:
    import transformers

    import quickmerge
    from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
    from quickmerge.eval.vision import time_settings_together

    if args.png and not args.rounds:
        raise SystemExit("--png plots top-1 against speed-up: give --rounds > 0")
    torch.set_num_threads(args.threads)
    model = transformers.VideoMAEForVideoClassification.from_pretrained(args.model, attn_implementation="sdpa").eval()
    items, labels = load_fashion_mnist("test")
    x, y = clips(items, labels, args.count, seed=args.clip_seed)

    def scored() -> tuple[list[float], torch.Tensor]:
        """Per-clip hits and the ``[clips, classes]`` float64 log-probabilities."""
        logp = torch.cat([model(pixel_values=x[i : i + args.batch]).logits.double().log_softmax(-1)
                          for i in range(0, len(x), args.batch)])
        return (logp.argmax(-1) == y).double().tolist(), logp

    hits, unmerged = scored()
    rows = [{"method": "none", "r": 0, "hits": hits, "kl": [0.0] * len(x)}]
    queries = sorted(set(args.saliency_queries), key=lambda q: (q != DEFAULT_QUERIES, q))  # the default row first
    variants = ([{"saliency_queries": q} for q in queries] + ([{"saliency": "mean"}] if args.saliency_mean else [])
                + ([dict(CHOSEN_MATCHING)] if args.hidden_scaled else []))
    for r in args.r:
        for method, options in [("tome", {})] + [("quickmerge", v) for v in variants]:
            with quickmerge.patch(model, r=r, method=method, **patch_options(method, options)) as handle:
                hits, merged = scored()
                kl = (unmerged.exp() * (unmerged - merged)).sum(-1)  # KL(unmerged || merged) per clip, nats
                rows.append({"method": method, "r": r, **options, "hits": hits, "kl": kl.tolist(),
                             "tokens_per_layer": handle.tokens_per_layer})
            print(f"{hits_key(method, r, options):>24}: {100 * sum(rows[-1]['hits']) / len(x):.2f}%", flush=True)
    jobs = [(None, 0, {})] + [(row["method"], row["r"], patch_options(row["method"], row_options(row)))
                              for row in rows[1:]]
    timing = time_settings_together(model, jobs, x[: args.batch], args.rounds) if args.rounds else None
    for i, row in enumerate(rows):
        row["top1"], row["top1_low"], row["top1_high"] = (100 * v for v in bootstrap_mean(row["hits"]))
        row["kl_millinats"] = [1e3 * v for v in bootstrap_mean(row["kl"])]
        if timing is not None:
            row["speedup"], row["speedup_per_round"] = timing[i]["speedup"], timing[i]["speedup_per_round"]
    for row in rows[1:]:
        if row["method"] == "quickmerge":
            tome = next(o for o in rows if o["method"] == "tome" and o["r"] == row["r"])
            row["minus_tome"] = [100 * v for v in bootstrap_difference(row["hits"], tome["hits"])]
            row["kl_minus_tome"] = [1e3 * v for v in bootstrap_difference(row["kl"], tome["kl"])]
            default = next((o for o in default_rows(rows) if o["method"] == "quickmerge" and o["r"] == row["r"]),
                           None)
            if default is not None and row is not default:
                row["minus_default_options"] = [100 * v for v in bootstrap_difference(row["hits"], default["hits"])]
                row["kl_minus_default_options"] = [1e3 * v for v in bootstrap_difference(row["kl"], default["kl"])]
        row["minus_unpatched"] = [100 * v for v in bootstrap_difference(row["hits"], rows[0]["hits"])]
    for row in rows:
        extra = "".join(f", {k} {v[0]:+.2f} [{v[1]:+.2f}, {v[2]:+.2f}]"
                        for k, v in row.items() if k.startswith(("minus", "kl_minus")))
        speed = f", {row['speedup']:.2f}x" if "speedup" in row else ""
        key = hits_key(row["method"], row["r"], row_options(row))
        print(f"{key:>24}: {row['top1']:.2f}%, KL {row['kl_millinats'][0]:.2f} millinats{speed}{extra}")
    if args.json:
        info = {"args": vars(args), "clips": len(x), "tokens": 256, "cores": os.cpu_count(),
                "platform": platform.platform(), "torch": torch.__version__, "transformers": transformers.__version__,
                "rows": [{k: v for k, v in row.items() if k not in ("hits", "kl")} for row in rows],
                "hits": {hits_key(row["method"], row["r"], row_options(row)):
                         "".join(str(int(h)) for h in row["hits"]) for row in rows}}
        Path(args.json).write_text(json.dumps(info, indent=2))
    if args.png:
        plot(default_rows(rows), len(x), Path(args.png))


def pool(args: argparse.Namespace) -> None:
    from quickmerge.eval.stats import bootstrap_mean

    runs = [json.loads(Path(path).read_text()) for path in args.evals]
    if args.png and not all("speedup" in run["rows"][0] for run in runs):
        raise SystemExit("--png plots top-1 against speed-up: every eval must have been timed (--rounds > 0)")
    sets: dict[tuple[int, int], list[dict]] = {}  # runs by the clips they score (clip seed, count)
    for run in runs:
        sets.setdefault((run["args"].get("clip_seed", 0), run["clips"]), []).append(run)
    models = [sorted(run["args"]["model"] for run in group) for group in sets.values()]
    if any(len(set(group)) != len(group) for group in models) or any(group != models[0] for group in models):
        raise SystemExit(f"evals: each clip set must be scored once by each of the same models, got {models}")
    if args.png and len(sets) > 1:
        raise SystemExit("--png draws one clip set: pool the evals of one clip seed to plot them")
    common = set.intersection(*({row["r"] for row in run["rows"] if row["method"] != "none"} for run in runs))
    if not common:
        raise SystemExit("evals: the runs share no r")

    def hits(run: dict, key: str) -> torch.Tensor:
        return torch.tensor([float(c) for c in run["hits"][key]], dtype=torch.float64)

    def averaged(key: str, base: str) -> list[float]:
        """Per-clip hits of ``key`` minus those of ``base``, averaged over the models, the clip sets one after
        another."""
        return torch.cat([torch.stack([hits(run, key) - hits(run, base) for run in group]).mean(0)
                          for group in sets.values()]).tolist()

    def per_model(key: str, base: str) -> list[float]:
        """Each model's mean difference ``key - base`` over all its clips, in points, models in name order."""
        return [100 * torch.cat([hits(run, key) - hits(run, base) for group in sets.values() for run in group
                                 if run["args"]["model"] == model]).mean().item() for model in models[0]]

    rows = []
    for r in sorted(common):
        row = {"r": r, "models": len(models[0]), "clip_sets": len(sets)}
        for method in ("tome", "quickmerge"):
            key = hits_key(method, r)
            row[f"{method}_top1"] = 100 * sum(hits(run, key).mean().item() for run in runs) / len(runs)
            row[f"{method}_minus_unpatched"] = [100 * v for v in bootstrap_mean(averaged(key, "none@0"))]
        ours, tome = hits_key("quickmerge", r), hits_key("tome", r)
        row["quickmerge_minus_tome"] = [100 * v for v in bootstrap_mean(averaged(ours, tome))]
        row["quickmerge_minus_tome_per_model"] = per_model(ours, tome)
        rows.append(row)
        d, each = row["quickmerge_minus_tome"], row["quickmerge_minus_tome_per_model"]
        print(f"r={r:>2}: ToMe-style {row['tome_top1']:.2f}%, QuickMerge++ {row['quickmerge_top1']:.2f}%, "
              f"QuickMerge++ minus ToMe-style {d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}] (mean of {len(each)} models on "
              f"{len(sets)} clip set(s); each model: {', '.join(f'{v:+.2f}' for v in each)})")
    # QuickMerge++ at other options, where every eval has them: against ToMe-style and against its defaults
    variants = set.intersection(*({key for key in run["hits"] if "/" in key} for run in runs))
    variant_rows = []
    keyed = sorted((int(key.split("@")[1].split("/")[0]), len(key), key) for key in variants)  # 4 before 32
    for r, _, key in keyed:
        suffix = key[key.index("/"):]
        tome, default = hits_key("tome", r), hits_key("quickmerge", r)
        row = {"r": r, "variant": suffix.strip("/"), **parse_variant(suffix), "models": len(models[0]),
               "clip_sets": len(sets), "top1": 100 * sum(hits(run, key).mean().item() for run in runs) / len(runs),
               "minus_tome": [100 * v for v in bootstrap_mean(averaged(key, tome))],
               "minus_tome_per_model": per_model(key, tome),
               "minus_default_options": [100 * v for v in bootstrap_mean(averaged(key, default))],
               "minus_default_options_per_model": per_model(key, default)}
        variant_rows.append(row)
        d, e = row["minus_tome"], row["minus_default_options"]
        print(f"r={r:>2}, QuickMerge++ {row['variant']}: {row['top1']:.2f}%, minus ToMe-style {d[0]:+.2f} "
              f"[{d[1]:+.2f}, {d[2]:+.2f}], minus its defaults {e[0]:+.2f} [{e[1]:+.2f}, {e[2]:+.2f}] "
              f"(each model: {', '.join(f'{v:+.2f}' for v in row['minus_default_options_per_model'])})")
    unpatched = 100 * sum(hits(run, "none@0").mean().item() for run in runs) / len(runs)
    if args.png:
        plot_pooled(runs, rows, Path(args.png))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "evals": args.evals, "models": models[0], "clip_sets": [{"clip_seed": seed, "clips": count}
                                                                     for seed, count in sets],
            "clips": sum(count for _, count in sets), "unpatched_top1": unpatched, "rows": rows,
            **({"variant_rows": variant_rows} if variant_rows else {})}, indent=2))


def plot_pooled(runs: list[dict], pooled: list[dict], path: Path) -> None:
    """Top-1 against speed-up for each method and model, and QuickMerge++ minus ToMe-style averaged over the models
    at each r with its interval (and each model's alone)."""
    from reporting import figure, interval_line, save_figure

    fig, axes = figure()
    for m, run in enumerate(runs):
        style = MODEL_STYLES[m % len(MODEL_STYLES)]
        accuracy_against_speed(axes[0], default_rows(run["rows"]), style, f", model {m + 1}")
    axes[0].set_title(f"VideoMAE on Moving Fashion-MNIST, {len(runs)} training seeds, {runs[0]['clips']:,} clips")
    rs = [row["r"] for row in pooled]
    for m, run in enumerate(runs):
        ours = [row for row in default_rows(run["rows"]) if row["method"] == "quickmerge" and row["r"] in rs]
        axes[1].plot([row["r"] + 0.6 * (m - (len(runs) - 1) / 2) for row in ours],
                     [row["minus_tome"][0] for row in ours], "x", color="grey",
                     label="each model alone" if m == 0 else None)
    interval_line(axes[1], rs, [tuple(row["quickmerge_minus_tome"]) for row in pooled],
                  f"QuickMerge++ minus ToMe-style, mean of {len(runs)} models")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(xlabel="r (tokens merged per block, of 256)", ylabel="top-1 difference (points, paired 95% CI)")
    axes[1].legend(fontsize=8)
    save_figure(fig, axes, path)


def accuracy_against_speed(ax, rows: list[dict], style: str = "o-", suffix: str = "") -> None:
    """One model's top-1 against speed-up, a line per method starting at the unpatched model (1x)."""
    for method, label, colour in (("tome", "ToMe-style", "C0"), ("quickmerge", "QuickMerge++", "C1")):
        mine = [row for row in rows if row["method"] == method]
        ax.plot([1.0] + [row["speedup"] for row in mine], [rows[0]["top1"]] + [row["top1"] for row in mine],
                style, color=colour, label=label + suffix)
    ax.set(xlabel="speed-up over the unpatched model (batch 256, 2 cores)", ylabel="top-1 (%)")


def plot(rows: list[dict], clip_count: int, path: Path) -> None:
    """Top-1 against speed-up for each method (the unpatched model at 1x), and QuickMerge++ minus ToMe-style at each
    r with its interval."""
    from reporting import figure, interval_line, save_figure

    fig, axes = figure()
    accuracy_against_speed(axes[0], rows)
    axes[0].set_title(f"VideoMAE on Moving Fashion-MNIST, {clip_count:,} test clips")
    ours = [row for row in rows if row["method"] == "quickmerge"]
    interval_line(axes[1], [row["r"] for row in ours], [tuple(row["minus_tome"]) for row in ours],
                  "QuickMerge++ minus ToMe-style")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[1].set(xlabel="r (tokens merged per block, of 256)", ylabel="top-1 difference (points, paired 95% CI)")
    save_figure(fig, axes, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    e = sub.add_parser("eval")
    e.add_argument("model")
    e.add_argument("--r", type=int, nargs="+", default=[8, 16, 24, 32])
    e.add_argument("--count", type=int, default=10_000)
    e.add_argument("--batch", type=int, default=256)
    e.add_argument("--rounds", type=int, default=10, help="timing rounds; 0: accuracy only")
    e.add_argument("--clip-seed", type=int, default=0, help="seed of the test clips (0: the reported set)")
    e.add_argument("--saliency-queries", type=positive_int, nargs="+", default=[DEFAULT_QUERIES],
                   help="QuickMerge++ at each of these counts of saliency queries (patch's saliency_queries)")
    e.add_argument("--saliency-mean", action="store_true", help="QuickMerge++ with saliency='mean' too")
    e.add_argument("--hidden-scaled", action="store_true",
                   help="QuickMerge++ with stop 47's matching too (similarity='hidden', saliency_rule='scaled')")
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--json", default=None)
    e.add_argument("--png", default=None, help="plot (needs matplotlib)")
    pl = sub.add_parser("pool", help="evaluations of several training seeds on the same clips, averaged per clip")
    pl.add_argument("evals", nargs="+", help="eval JSONs")
    pl.add_argument("--json", default=None)
    pl.add_argument("--png", default=None, help="plot (needs matplotlib; the evals must carry speed-ups)")
    args = ap.parse_args()
    {"train": train, "eval": evaluate, "pool": pool}[args.command](args)


if __name__ == "__main__":
    main()
