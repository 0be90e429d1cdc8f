"""Token merging in a SigLIP 2 NaFlex tower: batches of images of different aspect ratios, padded to one length.

    python benchmarks/siglip2_naflex.py --out docs/results/siglip2_naflex/siglip2_naflex_merging.json \
        --plot docs/img/siglip2_naflex_merging.png     # ~30 min training on 2 cores, then ~10 min of evaluation

No pretrained SigLIP 2 can be loaded offline here, so this trains one on Fashion-MNIST first: a Hugging Face
``Siglip2VisionModel`` (its attention-pooling head) under a linear classifier, fed the way NaFlex feeds it: each
image cropped to its object (trousers come out tall, sandals wide), then resized by transformers'
``Siglip2ImageProcessor`` to as many 4x4 patches as fit in 64 at the image's own aspect ratio, and padded to 64
with a padding mask. AdamW, cosine schedule, label smoothing, random flips and crop jitter; weights and a log go to
``--model-dir``; an interrupted training resumes from its last epoch.

Then, on the 10,000 test images (padded batches of 250, the padding share reported): top-1, the KL divergence from
the unmerged model's softmax (nats) and top-1 agreement with it, for QuickMerge++ (``quickmerge``: the defaults;
``quickmerge-hidden``: tokens compared by the residual stream, ``similarity="hidden"``, the rule chosen on training
images by ``benchmarks/exploration/siglip2_rules.py``) and ToMe-style matching (``tome``) at ``--r`` tokens per
block (padding merged first by all, as quickmerge.patch does for any padded batch), each with a 95% paired
bootstrap interval; and images/s of every setting against the unpatched model, timed interleaved
(``--timing-rounds`` rounds, the order rotating each round).
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
from torch import nn

from quickmerge.data.fashion_mnist import checksums, load_fashion_mnist
from quickmerge.vision.patch import LEGACY_MATCHING

PATCH, MAX_PATCHES = 4, 64
# QuickMerge++ as stop 56 ran it: patch's defaults of then (keys, additive saliency), named so the rows keep their
# meaning
LEGACY = dict(method="quickmerge", **LEGACY_MATCHING)
METHODS = {"quickmerge": LEGACY, "quickmerge-hidden": {**LEGACY, "similarity": "hidden"}, "tome": dict(method="tome")}
LABELS = {"quickmerge": "QuickMerge++", "quickmerge-hidden": "QuickMerge++, hidden similarity", "tome": "ToMe-style"}
ARCH = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, num_channels=3,
            patch_size=PATCH, num_patches=MAX_PATCHES, attn_implementation="sdpa")


class Classifier(nn.Module):
    """A SigLIP 2 vision tower and a linear layer on its pooled output."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import Siglip2VisionConfig, Siglip2VisionModel

        self.tower = Siglip2VisionModel(Siglip2VisionConfig(**ARCH))
        self.linear = nn.Linear(ARCH["hidden_size"], 10)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(self.tower(**inputs).pooler_output)


def naflex(images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """uint8 ``[B, 1, 28, 28]`` -> the processor's padded patches, mask and shapes, each image cropped to its
    object first (with ``generator``: the crop widened by 0-2 pixels per side at random, half the images flipped)."""
    from transformers import Siglip2ImageProcessor

    processor = Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES)
    crops = []
    for img in images:
        ys, xs = torch.nonzero(img[0] > 0, as_tuple=True)
        top, bottom, left, right = ys.min().item(), ys.max().item() + 1, xs.min().item(), xs.max().item() + 1
        if generator is not None:
            grow = torch.randint(0, 3, (4,), generator=generator).tolist()
            top, left = max(0, top - grow[0]), max(0, left - grow[1])
            bottom, right = min(28, bottom + grow[2]), min(28, right + grow[3])
        crop = img[:, top:bottom, left:right]
        if generator is not None and torch.rand(1, generator=generator).item() < 0.5:
            crop = crop.flip(-1)
        crops.append(crop.expand(3, -1, -1).numpy())
    out = processor(images=crops, return_tensors="pt", input_data_format="channels_first")
    return {k: out[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


def train(model_dir: Path, epochs: int, batch_size: int, lr: float, seed: int) -> Classifier:
    """Train (or resume, or load) the classifier in ``model_dir``."""
    model_dir.mkdir(parents=True, exist_ok=True)
    final, state_path, log_path = model_dir / "model.pt", model_dir / "state.pt", model_dir / "train_log.json"
    torch.manual_seed(seed)
    model = Classifier()
    if final.exists():
        model.load_state_dict(torch.load(final))
        return model.eval()
    images, labels = load_fashion_mnist("train")
    def loss(idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(naflex(images[idx], generator)), labels[idx], label_smoothing=0.1)

    log = train_epochs(model, state_path, samples=len(images), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                       loss=loss, clip_grad_norm=1.0)
    torch.save(model.state_dict(), final)
    state_path.unlink()
    log_path.write_text(json.dumps({"architecture": ARCH, "max_num_patches": MAX_PATCHES, "epochs": epochs,
                                    "batch_size": batch_size, "lr": lr, "seed": seed, "data_sha256": checksums(),
                                    "log": log}, indent=1))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("results/siglip2_naflex"))
    parser.add_argument("--epochs", type=int, default=4)
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
    batches = [naflex(images[i:i + 250]) for i in range(0, len(images), 250)]
    real = torch.cat([b["pixel_attention_mask"] for b in batches]).sum(1).double()
    compared = compare(model, model.tower, batches, labels, {m: METHODS[m] for m in args.methods}, args.r,
                       args.timing_images, args.timing_rounds)
    result = {"command": command_line("siglip2_naflex.py", args),
              "machine": f"{torch.get_num_threads()} CPU threads", "images": len(images),
              "tokens_per_image": MAX_PATCHES, "mean_real_patches": real.mean().item(),
              "padding_share": 1 - real.mean().item() / MAX_PATCHES, **compared}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.plot is not None:
        plot(result, args.plot, LABELS, "SigLIP 2 NaFlex tower, Fashion-MNIST (test set)")
    print_result(result)


if __name__ == "__main__":
    main()
