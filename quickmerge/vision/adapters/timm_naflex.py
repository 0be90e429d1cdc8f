"""timm ``NaFlexVit`` adapter: the ViT that takes images at their own aspect ratio and resolution.

``NaFlexVit`` runs timm's pre-norm ``Block`` (the hooks of :mod:`.timm_vit`: proportional attention through
``attn_mask``, queries and keys after ``q_norm`` / ``k_norm``, the residual merge at ``norm2`` / ``drop_path2``) on
either an image batch ``[B, C, H, W]`` or a NaFlex batch: each image's patches padded to one length, with their
coordinates and a validity mask (a dict from timm's NaFlex collator, or ``patch_coord`` / ``patch_valid``). For the
latter the model hands every block an additive padding mask made for the unmerged tokens (``[B, 1, N, N]``, or
``[B, 1, 1, N]`` key-only). In a pass that merges, the first block's pre-hook reads which tokens that mask lets
through, hands them to the merger (:meth:`~quickmerge.vision.patch.MergeHandle.set_padding`: padding gets size 0,
is merged first and weighs nothing) and every block runs without the model's mask: the merger's attention bias
masks the padding by size instead. A mask that is not a padding mask (other values than 0 and the dtype's lowest,
or a pattern that is not "real queries read real keys") is refused while merging rather than replaced.

The head's ``_pool`` reads the last pass's merged tokens over the patches they stand for: average pooling
(``avg`` / ``avgmax``) takes every real patch's own residual stream, normed, through timm's own masked pooling
(``unmerge="residual"``), or the tokens' size-weighted mean (``"copy"``); ``max`` the largest over real tokens;
attention pooling (``map``) gets log(size) as its mask. Class-token pooling is timm's own.

Refused: NaFlexVit with rotary position embeddings or EVA blocks (``rope_type``, ``attn_type="rope"`` / ``"eva"``,
SwiGLU, ...), whose per-token tables quickmerge does not merge here; ``forward_intermediates`` on NaFlex input while
merging (its tokens fill no single grid, and the ``patch_valid`` it returns would not line up with merged tokens).
Image batches get their feature maps unmerged onto the patch grid as timm's ViT does.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch import Tensor, nn

from ...call_arguments import CallArgument
from .instance import FeatureMaps, InstanceMethod
from .pooling import NormedStreams, pool_by_size
from .protocol import BlockMerger, Removable
from .timm_vit import attach_block, pre_norm_blocks

_POOL_ARGUMENTS = ("x", "pool_type", "patch_valid")  # NaFlexVit._pool's, timm 1.0.16 to 1.0.31


class TimmNaFlexVitAdapter:
    """timm ``NaFlexVit`` with standard pre-norm blocks (class and register tokens kept; NaFlex padding masked)."""

    name = "timm NaFlexVit"
    tested_classes = ("NaFlexVit",)

    def matches(self, model: nn.Module) -> bool:
        return any(c.__module__ == "timm.models.naflexvit" and c.__name__ == "NaFlexVit" for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def has_class_token(self, model: nn.Module) -> bool:
        return bool(getattr(model, "has_class_token", False))  # timm puts it first, before register tokens

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return bool(getattr(model, "grad_checkpointing", False))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        kinds = {type(b).__name__ for b in model.blocks} - {"Block"}
        if getattr(model, "rope", None) is not None or "EvaBlock" in kinds:
            what = "rotary position embeddings" if getattr(model, "rope", None) is not None else "EVA blocks"
            raise TypeError(f"{type(model).__name__} has {what}: quickmerge patches NaFlexVit with timm's standard ViT "
                            "blocks and learned or factorized positions (every naflexvit_* model but RADIO); rotary "
                            "ViTs are supported as timm Eva models")
        pool = getattr(model, "_pool", None)
        if not callable(pool) or tuple(inspect.signature(pool).parameters) != _POOL_ARGUMENTS:
            raise TypeError(f"{type(model).__name__} has no _pool(x, pool_type, patch_valid), where quickmerge weighs "
                            "merged tokens by size: this timm release is not supported")
        return pre_norm_blocks(model)

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        hooks: list[Removable] = []
        for i, block in enumerate(blocks):
            hooks += attach_block(block, i, merger)
        hooks += _padding_hooks(blocks, merger)
        hooks.append(FeatureMaps(model, merger, functools.partial(_grid, model), ("norm", lambda: model.norm),
                                 refuse=_refuse_naflex_input))
        hooks.append(NaFlexPool(model, merger))
        return hooks


def _grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The patch grid ``(H, W)`` NaFlexVit reshapes an image batch's tokens onto."""
    h, w = model.embeds.dynamic_feat_size((height, width))
    return int(h), int(w)


def _refuse_naflex_input(arguments: inspect.BoundArguments) -> None:
    if isinstance(next(iter(arguments.arguments.values())), dict) or arguments.arguments.get("patch_coord") is not None:
        raise ValueError("forward_intermediates on a NaFlex batch (patch dict or patch_coord) cannot be unmerged "
                         "while quickmerge merges: its images fill no single grid and its patch_valid would not line "
                         "up with merged tokens. Pass an image batch [B, C, H, W], or call it with handle.r = 0")


def padding_from_mask(mask: Tensor, n: int, num_prefix_tokens: int) -> Tensor:
    """``valid [B, N]`` (bool): the tokens an additive padding mask ``[B, 1, N or 1, N]`` lets real queries read.

    NaFlexVit's masks are 0 where allowed and the dtype's lowest value where not (or a bool mask, True allowed),
    either "real queries read real keys" (``[B, 1, N, N]``) or "every query reads real keys" (key-only). Any other
    mask would be lost when quickmerge replaces it: ValueError."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-1] != n or mask.shape[-2] not in (1, n):
        raise ValueError(f"NaFlexVit passed its blocks an attn_mask of shape {tuple(mask.shape)}, not a padding mask "
                         f"[B, 1, {n}, {n}] or [B, 1, 1, {n}] for its {n} tokens: quickmerge cannot merge with it")
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    else:
        allowed = mask[:, 0] == 0
        if not (allowed | (mask[:, 0] <= torch.finfo(mask.dtype).min)).all():
            raise ValueError("the attn_mask NaFlexVit passed its blocks holds values other than 0 and the lowest "
                             f"{mask.dtype}: a bias quickmerge would lose when it replaces the padding mask of merged "
                             "tokens. Merge without it, or pass patch_valid only")
    valid = allowed.any(dim=1)  # [B, N] keys some query reads
    key_only = torch.equal(allowed, valid[:, None, :].expand_as(allowed))
    symmetric = allowed.shape[1] == n and torch.equal(allowed, valid[:, :, None] & valid[:, None, :])
    if not (key_only or symmetric):
        raise ValueError("the attn_mask NaFlexVit passed its blocks is not a padding mask (real queries reading real "
                         "keys): quickmerge would lose it when it replaces the mask of merged tokens")
    if not valid[:, :num_prefix_tokens].all():
        raise ValueError("the attn_mask NaFlexVit passed its blocks masks a class or register token, which quickmerge "
                         "never merges and must keep")
    return valid


def _padding_hooks(blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
    """Pre-hooks (after each block's start hook) that take the model's padding mask off the blocks in a pass that
    needs queries and keys: the first block's reads which tokens are real and hands them to ``merger`` (where some
    are padding), then every block runs with ``attn_mask=None`` and :func:`.timm_vit.attach_block`'s hook adds the
    merger's bias, which masks the padding by size. A pass that does not merge keeps the model's mask."""
    argument = CallArgument.of(blocks[0], "attn_mask")
    state = {"replace": False}

    def block_pre(index: int, _m: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        mask = argument.get(args, kwargs)
        if index == 0:
            state["replace"] = mask is not None and merger.needs_qk()
            if state["replace"]:
                valid = padding_from_mask(mask, args[0].shape[1], merger.num_prefix_tokens)
                if not valid.all():
                    merger.set_padding(valid)
        if mask is None or not state["replace"]:
            return None
        return argument.replace(args, kwargs, None), kwargs

    return [block.register_forward_pre_hook(functools.partial(block_pre, i), with_kwargs=True)
            for i, block in enumerate(blocks)]


class NaFlexPool(InstanceMethod):
    """Per instance: ``model._pool`` reads the last pass's merged tokens over the real patches they stand for.

    Only for the tensor the last pass's final ``norm`` returned (what ``forward_head`` gets from
    ``forward_features``), when the pass merged: average pooling with the residual unmerge runs timm's own
    pooling (masked by ``patch_valid``) on every patch's own residual stream, normed; otherwise the size-weighted
    mean of the tokens (padding has size 0), for ``avgmax`` / ``max`` with the largest over real tokens; attention
    pooling gets log(size) as its mask. Class-token pooling and every other input are timm's own."""

    def __init__(self, model: nn.Module, merger: BlockMerger) -> None:
        original = model._pool

        def averages() -> bool:  # the head's own pooling reads every patch token: worth the deviations
            return getattr(model, "attn_pool", None) is None and model.global_pool in ("avg", "avgmax")

        streams = NormedStreams(model, model.norm, merger, averages)

        @functools.wraps(original)
        def _pool(x: Tensor, pool_type: str | None = None, patch_valid: Tensor | None = None) -> Tensor:
            kind = model.global_pool if pool_type is None else pool_type
            attn_pool = getattr(model, "attn_pool", None)
            ours = (attn_pool is not None or kind in ("avg", "avgmax", "max")) and x is streams.final.tensor
            weights = merger.pooling_weights(x) if ours else None
            if weights is None:
                return original(x, pool_type, patch_valid)
            p = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
            patches = streams.patches(x) if attn_pool is None and kind != "max" else None
            if patches is not None:  # every patch's own stream, normed: timm's pooling masks the padding
                return original(patches, pool_type, patch_valid)
            return pool_by_size(x[:, p:], weights[:, p:], kind, attn_pool)  # padding has size 0: left out

        self.streams = streams
        super().__init__(model, "_pool", _pool)

    def remove(self) -> None:
        self.streams.remove()
        super().remove()
