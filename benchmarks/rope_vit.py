"""Token merging in a rotary-position ViT: which rotation a merged token should carry, and QuickMerge++ vs ToMe-style.

    python benchmarks/rope_vit.py --out docs/results/rope_vit/rope_vit_merging.json \
        --plot docs/img/rope_vit_merging.png          # ~38 min training on 2 cores, then ~6 min of evaluation

No pretrained RoPE ViT can be loaded offline here, so this trains one on Fashion-MNIST first (timm ``Eva``, the
class behind EVA-02, DINOv3 and RoPE-ViT: 28x28 images in 2x2 patches, 196 patch tokens + a class token, rotary
positions only, no absolute ones; AdamW, cosine schedule, label smoothing, random shifts and flips; the weights
and a log go to ``--model-dir``, and an interrupted training resumes from its last epoch). Then, on the 10,000
test images, per image: the KL divergence from the unmerged model's softmax to the merged one's (nats), top-1
agreement with the unmerged model, and top-1, for

- the rotation a merged token carries (QuickMerge++ merging, ``--r`` tokens per block): ``mean`` (quickmerge's:
  the mean of its patches' sin and cos, so its logits are the mean of its patches' logits), ``unit`` (that mean
  rescaled to unit length per frequency: a pure rotation by the circular mean angle), ``first`` (the rotation of
  its first patch, as if the merged token stood where one of its members stood);
- QuickMerge++ vs ToMe-style matching, both with the ``mean`` rotation;

each difference with a 95% paired bootstrap interval over the images.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from reporting import command_line, figure, interval_line, save_figure
from resumable_training import train_epochs
from tqdm import tqdm

from quickmerge.data.fashion_mnist import checksums, load_fashion_mnist, normalize
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.vision import patch

RULES = ("mean", "unit", "first")
ARCH = dict(img_size=28, patch_size=2, in_chans=1, embed_dim=96, depth=4, num_heads=4, num_classes=10,
            use_rot_pos_emb=True, use_abs_pos_emb=False, ref_feat_shape=(14, 14), global_pool="avg")


def build() -> torch.nn.Module:
    from timm.models.eva import Eva

    return Eva(**ARCH)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels and horizontal flips, uint8 ``[B, 1, 28, 28]``."""
    b = images.shape[0]
    padded = F.pad(images, (2, 2, 2, 2))
    dx, dy = torch.randint(0, 5, (2, b), generator=generator)
    rows = (dy[:, None] + torch.arange(28))[:, :, None].expand(b, 28, 28)
    cols = (dx[:, None] + torch.arange(28))[:, None, :].expand(b, 28, 28)
    shifted = padded[torch.arange(b)[:, None, None], 0, rows, cols][:, None]
    flip = torch.rand(b, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], shifted.flip(-1), shifted)


def train(model_dir: Path, epochs: int, batch_size: int, lr: float, seed: int) -> torch.nn.Module:
    """Train (or resume, or load) the RoPE ViT in ``model_dir``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    final, state_path, log_path = model_dir / "model.pt", model_dir / "state.pt", model_dir / "train_log.json"
    model = build()
    if final.exists():
        model.load_state_dict(torch.load(final))
        return model.eval()
    images, labels = load_fashion_mnist("train")
    def loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(normalize(augment(images[idx], generator))), labels[idx], label_smoothing=0.1)

    log = train_epochs(model, state_path, samples=len(images), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                       loss=loss)
    torch.save(model.state_dict(), final)
    state_path.unlink()
    log_path.write_text(json.dumps({"architecture": ARCH, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                                    "seed": seed, "data_sha256": checksums(), "log": log}, indent=1))
    return model.eval()


def rotation_rule(rule: str):
    """A replacement for ``MergeHandle.mean_over_patches`` (``mean`` is the handle's own)."""
    def merged(handle, table: torch.Tensor) -> torch.Tensor:
        mean = type(handle).mean_over_patches(handle, table)
        if rule == "mean" or mean is table:
            return mean
        if rule == "unit":  # [sin | cos]: element i of each half is one angle
            sin, cos = mean.float().chunk(2, dim=-1)
            norm = (sin.square() + cos.square()).sqrt().clamp_min(1e-12)
            return torch.cat([sin / norm, cos / norm], dim=-1).to(table.dtype)
        st, p = handle._pass, handle.num_prefix_tokens  # "first": the row of each token's lowest patch
        b, k = st.size.shape[0], st.size.shape[1] - p
        group = st.origin[:, p:] - p
        patches = torch.arange(group.shape[1]).expand_as(group)
        first = torch.full((b, k + 1), group.shape[1], dtype=torch.long).scatter_reduce(
            1, torch.where(group >= 0, group, k), patches, "amin")[:, :k]
        return table[first][:, None]  # [B, 1, k, D]

    return merged


def log_probs(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.log_softmax(model(normalize(images[i:i + batch_size])).double(), -1)
                          for i in range(0, len(images), batch_size)])


def plot(result: dict, path: Path) -> None:
    """Top-1 and KL to the unmerged model against tokens per block, one line per rotation rule / matching."""
    fig, axes = figure()
    lines = sorted({(r["method"], r["rotation"]) for r in result["rows"]})
    for method, rule in lines:
        rows = sorted((r for r in result["rows"] if (r["method"], r["rotation"]) == (method, rule)),
                      key=lambda r: -r["mean_tokens_per_block"])
        tokens = [r["mean_tokens_per_block"] for r in rows]
        label = f"{'QuickMerge++' if method == 'quickmerge' else 'ToMe-style'}, {rule} rotation"
        for ax, metric, scale in ((axes[0], "top1", 100), (axes[1], "kl", 1)):
            interval_line(ax, tokens, [r[metric] for r in rows], label, scale=scale)
    axes[0].axhline(100 * result["unmerged_top1"][0], color="gray", ls="--", label="unmerged")
    axes[0].set(xlabel="mean tokens per block", ylabel="top-1 (%)", title="RoPE ViT on Fashion-MNIST (test set)")
    axes[1].set(xlabel="mean tokens per block", ylabel="KL(unmerged || merged), nats",
                title="distance from the unmerged model")
    for ax in axes:
        ax.invert_xaxis()
    save_figure(fig, axes, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("results/rope_vit"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None, help="also draw the figure here (PNG)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = train(args.model_dir, args.epochs, args.batch_size, args.lr, args.seed)
    images, labels = load_fashion_mnist("test")
    reference = log_probs(model, images)
    runs = {}
    settings = [(m, rule, r) for r in args.r for m, rule in [("quickmerge", x) for x in RULES] + [("tome", "mean")]]
    for method, rule, r in tqdm(settings, desc="merging settings"):
        with patch(model, r=r, method=method) as handle:
            handle.mean_over_patches = types.MethodType(rotation_rule(rule), handle)
            merged = log_probs(model, images)
            tokens = handle.mean_tokens
        kl = (reference.exp() * (reference - merged)).sum(-1)
        runs[f"{method}/{rule}/r={r}"] = {
            "method": method, "rotation": rule, "r": r, "mean_tokens_per_block": tokens,
            "kl": kl.tolist(), "agreement": (merged.argmax(-1) == reference.argmax(-1)).double().tolist(),
            "top1": (merged.argmax(-1) == labels).double().tolist()}
    unmerged_top1 = (reference.argmax(-1) == labels).double().tolist()
    rows, comparisons = [], []
    for run in runs.values():
        rows.append({k: v for k, v in run.items() if k not in ("kl", "agreement", "top1")}
                    | {m: bootstrap_mean(run[m]) for m in ("kl", "agreement", "top1")}
                    | {"top1_minus_unmerged": bootstrap_difference(run["top1"], unmerged_top1)})
    for r in args.r:
        base = runs[f"quickmerge/mean/r={r}"]
        for other in (f"quickmerge/unit/r={r}", f"quickmerge/first/r={r}", f"tome/mean/r={r}"):
            comparisons.append({"r": r, "what": f"quickmerge/mean minus {other}",
                                **{m: bootstrap_difference(base[m], runs[other][m]) for m in ("kl", "agreement",
                                                                                              "top1")}})
    result = {"command": command_line("rope_vit.py", args),
              "machine": f"{torch.get_num_threads()} CPU threads", "images": len(images),
              "unmerged_top1": bootstrap_mean(unmerged_top1), "rows": rows, "comparisons": comparisons,
              "note": "each entry (mean, low, high): mean over the test images and its 95% bootstrap interval; "
                      "comparisons are paired over the same images (kl: lower is closer to the unmerged model)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        plot(result, args.plot)
    for row in rows:
        print(f"{row['method']:>10} {row['rotation']:>5} r={row['r']:<3} top1 {row['top1'][0]:.4f} "
              f"KL {row['kl'][0]:.5f} agree {row['agreement'][0]:.4f}")
    for c in comparisons:
        print(f"r={c['r']:<3} {c['what']:<45} KL {c['kl'][0]:+.5f} [{c['kl'][1]:+.5f}, {c['kl'][2]:+.5f}] "
              f"top1 {c['top1'][0]:+.4f} [{c['top1'][1]:+.4f}, {c['top1'][2]:+.4f}]")


if __name__ == "__main__":
    main()
