"""timm's feature maps from the merged reference ViT against its other readings, on real test images.

    python benchmarks/exploration/feature_maps_check.py      # ~30 s on 2 cores

For the 90.85% reference ViT patched at r = 16 (QuickMerge++ and ToMe-style) and the first 256 Fashion-MNIST test
images, unmerged by copying (``unmerge="copy"``): whether ``forward_intermediates(x, indices=1, norm=True)`` equals
``handle.expand_to_patches`` of ``forward_features`` bit for bit, the largest gap between each map's mean over its
positions and the size-weighted mean of the merged patch tokens; for both unmerges (copying and the default
``"residual"``) the mean cosine similarity per patch to the unmerged model's maps.
"""
import torch

import quickmerge
from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision.adapters import mean_by_size

torch.set_num_threads(2)
model = load_fashion_vit()
x = normalize(load_fashion_mnist("test")[0][:256])
with torch.no_grad():
    unmerged = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    for method in ("quickmerge", "tome"):
        with quickmerge.patch(model, r=16, method=method, unmerge="copy") as handle:
            maps = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
            tokens = model.forward_features(x)
            same = torch.equal(maps.flatten(2).transpose(1, 2), handle.expand_to_patches(tokens)[:, 1:])
            gap = (maps.mean(dim=(2, 3)) - mean_by_size(tokens[:, 1:], handle.sizes[:, 1:])).abs().max().item()
            cosine = torch.nn.functional.cosine_similarity(maps, unmerged, dim=1).mean().item()
            handle.unmerge = "residual"
            residual = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
            restored = torch.nn.functional.cosine_similarity(residual, unmerged, dim=1).mean().item()
        print(f"{method}: maps {tuple(maps.shape)}, copying: equal to expand_to_patches {same}, mean gap {gap:.1e}, "
              f"cosine to unmerged {cosine:.3f}; residual: cosine to unmerged {restored:.3f}")
