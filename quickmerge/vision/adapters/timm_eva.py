"""timm ``Eva`` adapter: the rotary-position ViTs (EVA-02, DINOv3, RoPE-ViT, Perception Encoder, ...).

``EvaBlock.forward(x, rope)`` runs ``x + drop_path1(gamma_1 * attn(norm1(x), rope))`` then
``x + drop_path2(gamma_2 * mlp(norm2(x)))``, the pre-norm block of :mod:`.timm_vit`, whose hooks it
shares (``attn_mask`` for proportional attention, the residual merge at ``norm2`` / ``drop_path2``).
What differs is the rotary table ``rope`` (sin and cos per patch, ``[N0, D]``, or ``[H, N0, D]`` per
block in mixed mode) that ``Eva.forward_features`` hands every block: the block's pre-hook replaces it
with the merged tokens' table (:mod:`.rotary`), and because the attention rotates its queries and keys
after ``q_norm`` / ``k_norm``, the captured ones are turned with that table as the attention turns
them (grouped-query keys repeated per query head), so saliency and similarity see the attention's own
queries and keys. Prefix tokens (class, registers) take no rotation, as in timm.

Post-norm blocks (``EvaBlockPostNorm``) are refused: their MLP reads the un-normalised stream. Before timm
1.0.20 Eva's unfused attention read ``attn_mask`` as a boolean padding mask: proportional attention is
refused there (the fused path, the default, adds it as any timm ViT does).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import Tensor, nn

from .instance import FeatureMaps
from .protocol import BlockMerger, Removable
from .rotary import check_takes_table, rotary_table_hook
from .timm_vit import WeightedPool, attach_block, timm_grid

_REQUIRED = ("norm1", "attn", "norm2", "mlp", "drop_path2")


class TimmEvaAdapter:
    """timm ``Eva`` (class and register tokens kept, rotary tables merged with the tokens)."""

    name = "timm Eva (rotary ViTs: EVA-02, DINOv3, RoPE-ViT)"
    tested_classes = ("Eva",)

    def matches(self, model: nn.Module) -> bool:
        return any(c.__module__ == "timm.models.eva" and c.__name__ == "Eva" for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(model, "cls_token", None) is not None  # first, before the register tokens

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return bool(getattr(model, "grad_checkpointing", False))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = list(model.blocks)
        post_norm = [i for i, b in enumerate(blocks) if type(b).__name__ == "EvaBlockPostNorm"]
        if post_norm:
            raise TypeError(f"{type(model).__name__} has post-norm blocks (EvaBlockPostNorm, e.g. block "
                            f"{post_norm[0]}), whose MLP reads the stream before its norm: quickmerge merges "
                            "pre-norm blocks only")
        found = [b for b in blocks if all(hasattr(b, a) for a in _REQUIRED)
                 and hasattr(b.attn, "q_norm") and hasattr(b.attn, "k_norm")]
        if not blocks or len(found) != len(blocks):
            raise TypeError(f"{type(model).__name__}: {len(found)} of {len(blocks)} blocks have norm1, attn (with "
                            "q_norm / k_norm), norm2, mlp and drop_path2, where quickmerge hooks")
        check_takes_table(found, "rope")
        for i, block in enumerate(found):
            prefix = getattr(block.attn, "num_prefix_tokens", None)
            if prefix != model.num_prefix_tokens:
                raise TypeError(f"block {i}'s attention leaves {prefix} tokens unrotated, the model has "
                                f"{model.num_prefix_tokens} prefix tokens: the rotary table would not line up "
                                "with the merged tokens")
        return found

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        import timm
        from timm.layers import apply_rot_embed_cat

        refusal = None
        if _release(timm.__version__) < (1, 0, 20):
            refusal = (f"timm {timm.__version__}'s Eva attention reads attn_mask as a boolean padding mask when it "
                       "is not fused (fused_attn=False), so proportional attention cannot reach its logits: "
                       "pip install -U 'timm>=1.0.20', keep fused attention, or patch with prop_attn=False")
        hooks: list[Removable] = []
        prefix = model.num_prefix_tokens
        for i, block in enumerate(blocks):
            state: dict[str, Any] = {"table": None}
            attn = block.attn

            def rotate(t: Tensor, attn: nn.Module = attn, state: dict[str, Any] = state) -> Tensor:
                table = state["table"]
                if table is not None:  # as the attention rotates it (in mixed mode ``table`` is per head)
                    # timm before 1.0.20 has only the interleaved layout, and no ``half`` argument
                    half = {"half": True} if getattr(attn, "rotate_half", False) else {}
                    t = torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], table, **half)], 2)
                groups = attn.num_heads // t.shape[1]  # grouped-query keys: repeated per query head
                return t.repeat_interleave(groups, dim=1) if groups > 1 else t

            hooks += attach_block(block, i, merger, rotate=rotate, eager_mask_refusal=refusal)
            hooks.append(rotary_table_hook(block, "rope", merger, state))  # after the block's start hook
        if hasattr(model, "forward_intermediates"):
            hooks.append(FeatureMaps(model, merger, functools.partial(timm_grid, model), ("norm", lambda: model.norm)))
        if callable(getattr(model, "pool", None)) and isinstance(getattr(model, "norm", None), nn.Module):
            hooks.append(WeightedPool(model, merger, attn_pool_includes_prefix=True))
        return hooks


def _release(version: str) -> tuple[int, ...]:
    """``"1.0.20.dev0"`` -> ``(1, 0, 20)``."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])
