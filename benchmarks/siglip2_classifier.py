"""A patched ``Siglip2ForImageClassification``: its head's mean over the patches, on real NaFlex batches.

    python benchmarks/siglip2_classifier.py --out docs/results/siglip2_naflex/siglip2_classifier.json \
        --plot docs/img/siglip2_classifier.png      # ~1 min probe, then ~5 min of evaluation on 2 cores

The classifier of transformers' SigLIP 2 averages its tower's output tokens by the padding mask inside its own
forward; ``quickmerge.patch`` puts the merged tokens back on the patch grid for that mean, so the head reads the
size-weighted mean over the real patches. This measures it on real data: the SigLIP 2 tower that
``benchmarks/siglip2_naflex.py`` trained on Fashion-MNIST (run that first; its weights in ``--model-dir``) inside a
``Siglip2ForImageClassification`` whose linear head is fitted (a probe: the tower frozen, full-batch L-BFGS) on the
masked mean of the unmerged tower's tokens over ``--probe-images`` training images. Then, on the 10,000 test
images in padded batches of 250, for each method and r: the patched classifier's top-1 and KL divergence from the
unmerged classifier, beside the plain mean over the real merged tokens (what the head would read unweighted), with
95% paired bootstrap intervals, and the largest difference between the patched classifier's logits and the
classifier applied to the size-weighted mean of the tower's merged tokens (the exactness of the unmerge).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from reporting import command_line, figure, save_figure
from siglip2_naflex import ARCH, LABELS, METHODS, naflex, train
from tqdm import tqdm

from quickmerge.data.fashion_mnist import load_fashion_mnist
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.vision import patch
from quickmerge.vision.adapters.hf_clip import tower
from quickmerge.vision.adapters.pooling import mean_by_size

BATCH = 250


def classifier_from(model_dir: Path) -> torch.nn.Module:
    """A ``Siglip2ForImageClassification`` holding the trained tower (its head not yet fitted)."""
    from transformers import Siglip2Config, Siglip2ForImageClassification

    trained = train(model_dir, epochs=4, batch_size=128, lr=1e-3, seed=0)  # loads it when trained
    vision = {k: v for k, v in ARCH.items() if k != "attn_implementation"}
    config = Siglip2Config(vision_config=vision, num_labels=10)
    config.vision_config._attn_implementation = ARCH["attn_implementation"]
    classifier = Siglip2ForImageClassification(config).eval()
    tower(classifier).load_state_dict(tower(trained.tower).state_dict())
    return classifier


def masked_mean_features(classifier: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """``[N, C]`` the mean of the unmerged tower's tokens over each image's real patches (the head's input)."""
    features = []
    with torch.no_grad():
        for b in tqdm(batches, desc="probe features"):
            out = classifier.vision_model(pixel_values=b["pixel_values"], spatial_shapes=b["spatial_shapes"],
                                          **{_mask_name(classifier): b["pixel_attention_mask"]})
            features.append(mean_by_size(out.last_hidden_state, b["pixel_attention_mask"].float()))
    return torch.cat(features)


def _mask_name(classifier: torch.nn.Module) -> str:
    from quickmerge.call_arguments import takes_argument

    tower_takes = takes_argument(classifier.vision_model, "pixel_attention_mask")
    return "pixel_attention_mask" if tower_takes else "attention_mask"


def fit_probe(head: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor, weight_decay: float) -> float:
    """Fit ``head`` on ``features`` by full-batch L-BFGS (cross-entropy plus L2); returns the training top-1."""
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(features), labels) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (head(features).argmax(-1) == labels).double().mean().item()


def evaluate(classifier: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
             settings: dict | None) -> dict[str, torch.Tensor | float]:
    """Log-probabilities of the patched (or, with None, unpatched) classifier, those of the plain mean over the
    real merged tokens, and the largest |logit - classifier(size-weighted mean of the merged tokens)|."""
    kept: dict[str, torch.Tensor] = {}
    capture = classifier.vision_model.register_forward_hook(  # before the patch's: sees the merged tokens
        lambda _m, _a, out: kept.__setitem__("tokens", out.last_hidden_state))
    handle = None if settings is None else patch(classifier, **settings)
    weighted, plain, gap, tokens = [], [], 0.0, []
    try:
        with torch.no_grad():
            for b in batches:
                logits = classifier(**b).logits
                weighted.append(F.log_softmax(logits.double(), -1))
                if handle is None:
                    continue
                merged, sizes = kept["tokens"], handle.sizes
                by_size = classifier.classifier(mean_by_size(merged, sizes))
                gap = max(gap, (logits - by_size).abs().max().item())
                plain.append(F.log_softmax(classifier.classifier(mean_by_size(merged, (sizes > 0).float())).double(),
                                           -1))
                tokens.append(handle.mean_tokens)
    finally:
        capture.remove()
        if handle is not None:
            handle.remove()
    result: dict[str, torch.Tensor | float] = {"weighted": torch.cat(weighted)}
    if handle is not None:
        result |= {"plain": torch.cat(plain), "max_abs_logit_gap": gap, "mean_tokens": sum(tokens) / len(tokens)}
    return result


def plot(result: dict, path: Path) -> None:
    """KL from the unmerged classifier and top-1 against r: the head's mean by size (solid) and plain (dashed)."""
    fig, axes = figure()
    for k, (method, label) in enumerate(LABELS.items()):
        rows = [r for r in result["rows"] if r["method"] == method]
        if not rows:
            continue
        rs = [r["r"] for r in rows]
        for ax, metric, scale in ((axes[0], "top1", 100), (axes[1], "kl", 1)):
            for pool, style in (("weighted", "-"), ("plain", "--")):
                ax.plot(rs, [scale * r[pool][metric][0] for r in rows], style, marker="o", color=f"C{k}",
                        label=f"{label}, {'mean by size (patched classifier)' if pool == 'weighted' else 'plain mean'}")
    axes[0].axhline(100 * result["unmerged_top1"][0], color="gray", ls=":", label="unmerged")
    axes[0].set(xlabel="tokens merged per block (r)", ylabel="top-1 (%)",
                title="Siglip2ForImageClassification, Fashion-MNIST (test)")
    axes[1].set(xlabel="tokens merged per block (r)", ylabel="KL(unmerged || merged), nats",
                title="distance from the unmerged classifier")
    save_figure(fig, axes, path, legend_fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("results/siglip2_naflex"))
    parser.add_argument("--probe-images", type=int, default=10000)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--r", type=int, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plot", type=Path, default=None, help="also draw the figure here (PNG)")
    args = parser.parse_args()
    if not (args.model_dir / "model.pt").exists():
        parser.error(f"--model-dir {args.model_dir} holds no trained tower (model.pt): run "
                     "benchmarks/siglip2_naflex.py first")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classifier = classifier_from(args.model_dir)
    train_images, train_labels = load_fashion_mnist("train")
    probe = [naflex(train_images[i:i + BATCH]) for i in range(0, args.probe_images, BATCH)]
    probe_top1 = fit_probe(classifier.classifier, masked_mean_features(classifier, probe),
                           train_labels[:args.probe_images], args.weight_decay)
    images, labels = load_fashion_mnist("test")
    batches = [naflex(images[i:i + BATCH]) for i in range(0, len(images), BATCH)]
    reference = evaluate(classifier, batches, None)["weighted"]
    unmerged_top1 = (reference.argmax(-1) == labels).double().tolist()
    rows, comparisons = [], []
    for r in tqdm(args.r, desc="r"):
        for method in args.methods:
            run = evaluate(classifier, batches, dict(METHODS[method], r=r))
            per_image = {}
            for pool in ("weighted", "plain"):
                logp = run[pool]
                per_image[pool] = {"kl": (reference.exp() * (reference - logp)).sum(-1).tolist(),
                                   "top1": (logp.argmax(-1) == labels).double().tolist()}
            rows.append({"method": method, "r": r, "settings": dict(METHODS[method], r=r),
                         "mean_tokens_per_block": run["mean_tokens"], "max_abs_logit_gap": run["max_abs_logit_gap"],
                         **{pool: {m: bootstrap_mean(v) for m, v in per_image[pool].items()} for pool in per_image},
                         "weighted_minus_plain": {m: bootstrap_difference(per_image["weighted"][m],
                                                                          per_image["plain"][m])
                                                  for m in ("kl", "top1")},
                         "weighted_top1_minus_unmerged": bootstrap_difference(per_image["weighted"]["top1"],
                                                                              unmerged_top1)})
            comparisons.append((method, r, per_image["weighted"]))
    versus_tome = []
    for method, r, qm in comparisons:
        tome = next((w for m, rr, w in comparisons if m == "tome" and rr == r), None)
        if method != "tome" and tome is not None:
            versus_tome.append({"r": r, "what": f"{method} minus tome",
                                **{m: bootstrap_difference(qm[m], tome[m]) for m in ("kl", "top1")}})
    result = {"command": command_line("siglip2_classifier.py", args),
              "machine": f"{torch.get_num_threads()} CPU threads", "images": len(images),
              "probe_images": args.probe_images, "probe_train_top1": probe_top1,
              "unmerged_top1": bootstrap_mean(unmerged_top1), "rows": rows, "versus_tome": versus_tome,
              "note": "each entry (mean, low, high): mean over the test images and its 95% bootstrap interval; "
                      "differences paired over the same images (kl: nats, lower is closer to the unmerged "
                      "classifier). weighted: the patched Siglip2ForImageClassification (its own masked mean of "
                      "the tokens put back on the patch grid); plain: the classifier on the unweighted mean of "
                      "the real merged tokens of the same pass"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        plot(result, args.plot)
    print(f"probe train top1 {probe_top1:.4f}; unmerged test top1 {result['unmerged_top1'][0]:.4f}")
    for row in rows:
        d = row["weighted_minus_plain"]
        print(f"{row['method']:>17} r={row['r']:<2} tokens {row['mean_tokens_per_block']:.1f} top1 "
              f"{row['weighted']['top1'][0]:.4f} (plain {row['plain']['top1'][0]:.4f}, "
              f"{d['top1'][0]:+.4f} [{d['top1'][1]:+.4f}, {d['top1'][2]:+.4f}]) KL {row['weighted']['kl'][0]:.5f} "
              f"(plain {row['plain']['kl'][0]:.5f}, {d['kl'][0]:+.5f} [{d['kl'][1]:+.5f}, {d['kl'][2]:+.5f}]) "
              f"gap {row['max_abs_logit_gap']:.1e}")
    for c in versus_tome:
        print(f"r={c['r']:<2} {c['what']} KL {c['kl'][0]:+.5f} [{c['kl'][1]:+.5f}, {c['kl'][2]:+.5f}] "
              f"top1 {c['top1'][0]:+.4f} [{c['top1'][1]:+.4f}, {c['top1'][2]:+.4f}]")


if __name__ == "__main__":
    main()
