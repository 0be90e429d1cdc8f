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
from pathlib import Path

import torch
import torch.nn.functional as F
from naflex_merging import compare, plot, print_result
from reporting import command_line
from resumable_training import train_epochs
from siglip2_naflex import MAX_PATCHES, PATCH, naflex
from torch import nn

from quickmerge.data.fashion_mnist import checksums, load_fashion_mnist

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
    compared = compare(model, model, batches, labels, {m: METHODS[m] for m in args.methods}, args.r,
                       args.timing_images, args.timing_rounds)
    import timm

    result = {"command": command_line("timm_naflex.py", args), "timm": timm.__version__,
              "machine": f"{torch.get_num_threads()} CPU threads", "images": len(images),
              "tokens_per_image": MAX_PATCHES, "mean_real_patches": real.mean().item(),
              "padding_share": 1 - real.mean().item() / MAX_PATCHES, **compared}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        plot(result, args.plot, LABELS, "timm NaFlexVit, NaFlex batches, Fashion-MNIST (test set)")
    print_result(result)


if __name__ == "__main__":
    main()
