"""Source maps: which patches ended up in which token, drawn over the image (``quickmerge visualize``).

Each output token's patches are filled with their mean colour and outlined, as in ToMe's
visualisations, so large uniform regions show as few big groups and detailed regions as
many small ones. Images: Fashion-MNIST test images and real photos shipped with
scikit-image (shown at full resolution; the model sees them as 28x28 grey).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._optional import require
from ..data.fashion_mnist import CLASSES, MEAN, STD, normalize
from ..errors import MissingExtraError
from .budget import DEFAULT_FLOOR, constant_schedule
from .image_budget import ImageBudget, bucketed_forward
from .patch import patch
from .token_scorer import TokenScorer

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")


def load_photos(names: tuple[str, ...] = PHOTOS, size: int = 336) -> list[np.ndarray]:
    """Centre-cropped square RGB photos ``[size, size, 3]`` in [0, 1] from scikit-image's data folder."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        raise MissingExtraError(
            "the photos ship with scikit-image, which is not installed: pip install 'quickmerge[vision]'"
        )
    plt = require("matplotlib.pyplot", "plot", "Reading the photos")
    base = Path(spec.origin).parent / "data"
    photos = []
    for name in names:
        img = plt.imread(base / name)
        img = img[..., :3] if img.ndim == 3 else np.repeat(img[..., None], 3, axis=-1)
        img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else 1.0)
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]
        photos.append(F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy())
    return photos


def photo_to_model_input(photo: np.ndarray, side: int = 28) -> torch.Tensor:
    """RGB photo ``[H, W, 3]`` -> standardised grey ``[1, side, side]`` like a Fashion-MNIST image."""
    grey = torch.from_numpy(photo @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[None, None]
    small = F.interpolate(grey, size=(side, side), mode="bilinear", antialias=True)[0]
    return (small - MEAN) / STD


@torch.inference_mode()
def source_groups(model: nn.Module, images: torch.Tensor, grid: int, image_budget: ImageBudget | None = None,
                  **merge: Any) -> tuple[np.ndarray, torch.Tensor]:
    """Final token of each patch, ``[B, grid, grid]``, and the model's logits, for one merge setting; with
    ``image_budget`` each bucket of images runs at its own r
    (:func:`~quickmerge.vision.image_budget.bucketed_forward`)."""
    with patch(model, trace_source=True, **merge) as handle:
        if image_budget is None:
            logits = model(images)
            source = handle.source[:, handle.num_prefix_tokens :]
        else:
            source = torch.empty(len(images), grid * grid, dtype=torch.long, device=images.device)

            def keep(index: torch.Tensor) -> None:
                source[index] = handle.source[:, handle.num_prefix_tokens :]

            logits, _ = bucketed_forward(model, handle, images, image_budget, after=keep)
    return source.reshape(-1, grid, grid).cpu().numpy(), logits


def draw_groups(image: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Fill each group of ``groups [g, g]`` with its mean colour in ``image [S, S, 3]`` and outline it."""
    s = image.shape[0]
    ids = np.kron(groups, np.ones((s // groups.shape[0], s // groups.shape[1]), dtype=groups.dtype))
    ids = ids[:s, :s]
    flat = ids.reshape(-1)
    valid = flat >= 0
    counts = np.bincount(flat[valid], minlength=flat.max() + 1).astype(np.float32)
    means = np.stack([np.bincount(flat[valid], weights=image[..., c].reshape(-1)[valid], minlength=len(counts))
                      for c in range(3)], axis=-1) / np.maximum(counts, 1)[:, None]
    out = np.where(valid[:, None], means[flat.clip(0)], 0.0).reshape(s, s, 3)
    edge = np.zeros((s, s), dtype=bool)
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[1:, :] |= ids[1:, :] != ids[:-1, :]
    out[edge] = 1.0
    return out


def visualize(model: nn.Module, fashion: torch.Tensor, labels: torch.Tensor, path: str, *, r: int = 24,
              photos: list[np.ndarray] | None = None, scorer: TokenScorer | None = None,
              options: Mapping[str, Any] | None = None, schedule: list[int] | None = None,
              image_budget: ImageBudget | None = None, keep_order: bool = False) -> str:
    """Write a PNG: per image, the input and the groups of QuickMerge++ and ToMe-style at ``r`` per block.

    ``fashion``: uint8 ``[B, 1, 28, 28]`` test images; ``photos``: RGB arrays (optional);
    ``scorer``: a fine-tune's learned saliency, used by QuickMerge++; ``options``: more :func:`patch` settings of
    the QuickMerge++ column (``matching``, ``similarity``, ``saliency_rule``, ``saliency_weight``), named in the
    title. With ``matching="greedy"`` QuickMerge++ merges ``r`` per block until
    :data:`~quickmerge.vision.budget.DEFAULT_FLOOR` tokens are left, past the half of a block's tokens that
    ToMe-style's bipartite matching can merge; its column then shows ToMe-style at that most, said in its title.
    QuickMerge++'s budget at the cost of ``r``, instead of ``r`` in every block: ``schedule``, tokens merged per
    block (:func:`~quickmerge.vision.budget.entropy_schedule`), or ``image_budget``, each image's own r.
    ``keep_order``: both columns keep the tokens in patch order inside the blocks (:func:`patch`'s ``keep_order``,
    ``quickmerge eval vision --keep-order``), which changes the alternate sets later blocks match between.
    """
    plt = require("matplotlib.pyplot", "plot", "quickmerge visualize")
    grid = 28 // int(model.patch_embed.patch_size[0])
    options = dict(options or {})
    greedy = options.get("matching") == "greedy"
    blocks, tokens = len(model.blocks), grid * grid
    if r > tokens - DEFAULT_FLOOR or (r > tokens // 2 and not greedy):
        most = tokens - DEFAULT_FLOOR if greedy else tokens // 2
        raise ValueError(f"r must be at most {most} with {options.get('matching', 'bipartite')} matching (a block "
                         f"of {tokens} patch tokens merges at most half by bipartite matching and keeps at least "
                         f"{DEFAULT_FLOOR}), got {r}")
    inputs = list(normalize(fashion))
    shown = [np.repeat(F.interpolate(img[None].float() / 255.0, scale_factor=12, mode="nearest")[0, 0, ..., None]
                       .numpy(), 3, axis=-1) for img in fashion]
    titles = [f"{CLASSES[int(y)]}" for y in labels]
    for photo in photos or []:
        inputs.append(photo_to_model_input(photo))
        shown.append(photo)
        titles.append("photo (model sees 28x28 grey)")
    batch = torch.stack(inputs)
    if schedule is not None and image_budget is not None:
        raise ValueError("give QuickMerge++ a per-block schedule or a per-image budget, not both")
    ours = "QuickMerge++" if scorer is None else "QuickMerge++ (learned)"
    budget = "per-block schedule" if schedule is not None else "per-image budget" if image_budget is not None else ""
    tome_r = min(r, tokens // 2)
    ours_r = schedule or (constant_schedule(tokens, r, blocks, bipartite=False) if greedy else r)
    tome = "ToMe-style" if tome_r == r else f"ToMe-style at its most (r={tome_r})"
    columns = [(f"{ours} ({budget})" if budget else ours,
                {"method": "quickmerge", "scorer": scorer, "r": ours_r, "image_budget": image_budget, **options,
                 "keep_order": keep_order}),
               (tome, {"method": "tome", "r": tome_r, "keep_order": keep_order})]
    maps = {name: source_groups(model, batch, grid, **cfg) for name, cfg in columns}
    fig, axes = plt.subplots(len(shown), 3, figsize=(7.5, 2.5 * len(shown)))
    axes = np.atleast_2d(axes)
    for i, image in enumerate(shown):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(titles[i], fontsize=8)
        for j, (name, _) in enumerate(columns, start=1):
            groups, logits = maps[name]
            n_groups = len(np.unique(groups[i][groups[i] >= 0]))
            pred = CLASSES[int(logits[i].argmax())]
            axes[i, j].imshow(draw_groups(image, groups[i]))
            axes[i, j].set_title(f"{name}\n{n_groups} tokens, says {pred}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    setting = ", ".join([f"{k}={v}" for k, v in options.items() if k != "matching" or greedy]
                        + ([f"r={schedule} by block"] if schedule is not None else [])
                        + ([f"r={image_budget.r} by bucket, simplest first"] if image_budget is not None else []))
    title = f"Which patches merged into which token after {blocks} blocks: r={r} per block" + (
        " or its cost" if budget else "") + (", tokens kept in patch order" if keep_order else "")
    title += f"\n{ours}: {setting}" if setting else ""
    fig.suptitle(title, fontsize=10)
    top_inches = 0.25 + 0.2 * title.count("\n")
    fig.tight_layout(rect=(0, 0, 1, 1 - top_inches / fig.get_figheight()))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
