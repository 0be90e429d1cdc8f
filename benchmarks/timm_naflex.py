"""Token merging in a timm NaFlexVit fed NaFlex batches: images at their own aspect ratio, padded to one length.

    python benchmarks/timm_naflex.py --out docs/results/stop84/timm_naflex_merging.json \
        --plot docs/img/timm_naflex_merging.png     # ~30 min training on 2 cores, then ~10 min of evaluation

No pretrained NaFlexVit can be loaded offline here, so this trains one on Fashion-MNIST first: timm's ``NaFlexVit``
shaped as its ImageNet model ``naflexvit_base_patch16_gap`` (4 register tokens, no class token, LayerScale, average
pooling then a norm), scaled down to 6 blocks of width 128 and 4x4 patches. The NaFlex batches are those of
``siglip2_naflex.py`` (each image cropped to its object, resized to as many 4x4 patches as fit in 64 at its own
aspect ratio, padded to 64 with a padding mask), handed to the model as timm's NaFlex collator does (``patches``,
``patch_coord``, ``patch_valid``). AdamW, cosine schedule, label smoothing, random flips and crop jitter; weights and
a log go to ``--model-dir``; an interrupted training resumes from its last epoch.

Then, on the 10,000 test images (padded batches of 250): top-1, the KL divergence from the unmerged model's softmax
(nats) and top-1 agreement with it, for QuickMerge++ (``quickmerge``, patch's defaults) and ToMe-style matching
(``tome``) at ``--r`` tokens per block (padding merged first by both), each with a 95% paired bootstrap interval;
and images/s of every setting against the unpatched model, timed interleaved (``--timing-rounds`` rounds, the order
rotating each round).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from reporting import command_line, figure, interval_line, save_figure
from resumable_training import train_epochs
from siglip2_naflex import MAX_PATCHES, PATCH, log_probs, naflex
from torch import nn
from tqdm import tqdm

from quickmerge.data.fashion_mnist import checksums, load_fashion_mnist
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.vision import patch

METHODS = {"quickmerge": dict(method="quickmerge"), "tome": dict(method="tome")}
LABELS = {"quickmerge": "QuickMerge++", "tome": "ToMe-style"}
ARCH = dict(patch_size=PATCH, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0, init_values=1e-5,
            global_pool="avg", reg_tokens=4, fc_norm=True, pos_embed_grid_size=(8, 8))


def build() -> nn.Module:
    from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg

    return NaFlexVit(NaFlexVitCfg(**ARCH), in_chans=3, num_classes=10)


def timm_batch(images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """uint8 ``[B, 1, 28, 28]`` -> timm's NaFlex batch: ``patches [B, 64, 48]``, ``patch_coord [B, 64, 2]`` (y, x)
    and ``patch_valid [B, 64]``, from the processor's padded patches and each image's patch grid."""
    hf = naflex(images, generator)
    b, n = hf["pixel_attention_mask"].shape
    coord = torch.zeros(b, n, 2, dtype=torch.long)
    for i, (h, w) in enumerate(hf["spatial_shapes"].tolist()):
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        coord[i, : h * w] = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)
    return {"patches": hf["pixel_values"].float(), "patch_coord": coord,
            "patch_valid": hf["pixel_attention_mask"].bool()}


def train(model_dir: Path, epochs: int, batch_size: int, lr: float, seed: int) -> nn.Module:
    """Train (or resume, or load) the model in ``model_dir``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    final, state_path, log_path = model_dir / "model.pt", model_dir / "state.pt", model_dir / "train_log.json"
    torch.manual_seed(seed)
    model = build()
    if final.exists():
        model.load_state_dict(torch.load(final))
        return model.eval()
    images, labels = load_fashion_mnist("train")

    def loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(timm_batch(images[idx], generator)), labels[idx], label_smoothing=0.1)

    log = train_epochs(model, state_path, samples=len(images), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                       loss=loss, clip_grad_norm=1.0)
    torch.save(model.state_dict(), final)
    state_path.unlink()
    import timm

    log_path.write_text(json.dumps({"architecture": ARCH, "timm": timm.__version__, "max_num_patches": MAX_PATCHES,
                                    "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                                    "data_sha256": checksums(), "log": log}, indent=1))
    return model.eval()


def timed(model: nn.Module, batches: list[dict[str, torch.Tensor]], settings: list[dict | None],
          rounds: int) -> list[float]:
    """Images/s of each setting (None: unpatched), all timed in each round, the order rotating per round."""
    seconds = [0.0] * len(settings)
    images = sum(len(b["patches"]) for b in batches)
    for k in tqdm(range(rounds), desc="timing rounds"):
        for j in range(len(settings)):
            i = (j + k) % len(settings)
            with torch.no_grad():
                handle = None if settings[i] is None else patch(model, **settings[i])
                began = time.perf_counter()
                for b in batches:
                    model(b)
                seconds[i] += time.perf_counter() - began
                if handle is not None:
                    handle.remove()
    return [rounds * images / s for s in seconds]


def plot(result: dict, path: Path) -> None:
    """Top-1 and KL to the unmerged model against the speed-up, one line per method."""
    fig, axes = figure()
    for method, label in LABELS.items():
        rows = [r for r in result["rows"] if r["method"] == method]
        if not rows:
            continue
        speed = [r["speedup"] for r in rows]
        for ax, metric, scale in ((axes[0], "top1", 100), (axes[1], "kl", 1)):
            interval_line(ax, speed, [r[metric] for r in rows], label, scale=scale)
    axes[0].axhline(100 * result["unmerged_top1"][0], color="gray", ls="--", label="unmerged")
    axes[0].set(xlabel="speed-up over the unpatched model", ylabel="top-1 (%)",
                title="timm NaFlexVit, NaFlex batches, Fashion-MNIST (test set)")
    axes[1].set(xlabel="speed-up over the unpatched model", ylabel="KL(unmerged || merged), nats",
                title="distance from the unmerged model")
    save_figure(fig, axes, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("results/timm_naflex"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--timing-images", type=int, default=2000)
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None, help="also draw the figure here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = train(args.model_dir, args.epochs, args.batch_size, args.lr, args.seed)
    images, labels = load_fashion_mnist("test")
    batches = [timm_batch(images[i:i + 250]) for i in range(0, len(images), 250)]
    real = torch.cat([b["patch_valid"] for b in batches]).sum(1).double()
    reference = log_probs(model, batches)
    unmerged_top1 = (reference.argmax(-1) == labels).double().tolist()
    names = [(m, r) for r in args.r for m in args.methods]
    settings = [dict(METHODS[m], r=r) for m, r in names]
    runs = {}
    for (name, r), s in tqdm(list(zip(names, settings, strict=True)), desc="merging settings"):
        with patch(model, **s) as handle:
            merged = log_probs(model, batches)
            tokens = handle.mean_tokens
        kl = (reference.exp() * (reference - merged)).sum(-1)
        runs[f"{name}/r={r}"] = {
            "method": name, "settings": s, "r": r, "mean_tokens_per_block": tokens, "kl": kl.tolist(),
            "agreement": (merged.argmax(-1) == reference.argmax(-1)).double().tolist(),
            "top1": (merged.argmax(-1) == labels).double().tolist()}
    timing_batches = batches[: max(1, args.timing_images // 250)]
    speed = timed(model, timing_batches, [None, *settings], args.timing_rounds)
    rows, comparisons = [], []
    for run, images_per_s in zip(runs.values(), speed[1:], strict=True):
        rows.append({k: v for k, v in run.items() if k not in ("kl", "agreement", "top1")}
                    | {m: bootstrap_mean(run[m]) for m in ("kl", "agreement", "top1")}
                    | {"top1_minus_unmerged": bootstrap_difference(run["top1"], unmerged_top1),
                       "images_per_s": images_per_s, "speedup": images_per_s / speed[0]})
    if "tome" in args.methods and "quickmerge" in args.methods:
        for r in args.r:
            qm, tome = runs[f"quickmerge/r={r}"], runs[f"tome/r={r}"]
            comparisons.append({"r": r, "what": "quickmerge minus tome",
                                **{m: bootstrap_difference(qm[m], tome[m]) for m in ("kl", "agreement", "top1")}})
    import timm

    result = {"command": command_line("timm_naflex.py", args), "timm": timm.__version__,
              "machine": f"{torch.get_num_threads()} CPU threads", "images": len(images),
              "tokens_per_image": MAX_PATCHES, "mean_real_patches": real.mean().item(),
              "padding_share": 1 - real.mean().item() / MAX_PATCHES,
              "unmerged_top1": bootstrap_mean(unmerged_top1), "unpatched_images_per_s": speed[0],
              "rows": rows, "comparisons": comparisons,
              "note": "each entry (mean, low, high): mean over the test images and its 95% bootstrap interval; "
                      "comparisons are paired over the same images (kl: lower is closer to the unmerged model); "
                      "images/s from the interleaved timing rounds, speed-up against the unpatched model timed "
                      "in the same rounds"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        plot(result, args.plot)
    print(f"unmerged top1 {result['unmerged_top1'][0]:.4f}, padding share {result['padding_share']:.3f}")
    for row in rows:
        print(f"{row['method']:>10} r={row['r']:<3} tokens {row['mean_tokens_per_block']:.1f} top1 "
              f"{row['top1'][0]:.4f} KL {row['kl'][0]:.5f} speed-up {row['speedup']:.2f}x")
    for c in comparisons:
        print(f"r={c['r']:<3} {c['what']} KL {c['kl'][0]:+.5f} [{c['kl'][1]:+.5f}, {c['kl'][2]:+.5f}] "
              f"top1 {c['top1'][0]:+.4f} [{c['top1'][1]:+.4f}, {c['top1'][2]:+.4f}]")


if __name__ == "__main__":
    main()
