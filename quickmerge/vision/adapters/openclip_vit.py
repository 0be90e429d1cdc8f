"""OpenCLIP ``VisionTransformer`` adapter: the image tower of an OpenCLIP model (``model.visual``).

``ResidualAttentionBlock.forward`` is ``x = q_x + ls_1(attention(ln_1(q_x)))`` then
``x + ls_2(mlp(ln_2(x)))``, its attention a batch-first ``torch.nn.MultiheadAttention``:

- the attention's pre-hook (:mod:`.multihead`) passes log(size) as its mask (proportional attention) and
  computes what the merge reads of the queries and keys, which ``nn.MultiheadAttention`` does not expose,
  with the module's own ``in_proj`` weights;
- ``ln_2``, ``ls_2`` and the block: the residual merge of :mod:`.residual`.

The class token (``pool_type="tok"``, the default) needs nothing more; ``pool_type="avg"``
averages over the patches (the instance's ``_global_pool`` wraps OpenCLIP's: each patch's own residual stream,
normed, where ``ln_post`` comes first, or the tokens by size); ``forward_intermediates``
unmerges each block's tokens before its feature-map reshape (:class:`.instance.FeatureMaps`).
Attention-pooling towers (CoCa) and the custom blocks of qk-norm or scaled-cosine models are refused.
"""

from __future__ import annotations

import functools

from torch import Tensor, nn

from .instance import FeatureMaps, InstanceMethod
from .multihead import is_plain_multihead, multihead_attention_hook
from .pooling import NormedStreams, mean_by_size
from .protocol import BlockMerger, Removable
from .residual import residual_merge_hooks

_PARTS = ("ln_1", "attn", "ln_2", "mlp", "ls_2")


class OpenCLIPViTAdapter:
    """OpenCLIP ``VisionTransformer`` (``open_clip.transformer``); its class token is kept."""

    name = "OpenCLIP VisionTransformer"
    tested_classes = ("VisionTransformer",)

    def matches(self, model: nn.Module) -> bool:
        return any(c.__module__ == "open_clip.transformer" and c.__name__ == "VisionTransformer"
                   for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # OpenCLIP's image tower always prepends one class token

    def has_class_token(self, model: nn.Module) -> bool:
        return True

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return bool(getattr(model.transformer, "grad_checkpointing", False)) and model.training

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        if getattr(model, "attn_pool", None) is not None:
            raise TypeError(f"{type(model).__name__} pools with attention (a CoCa tower): not supported by "
                            "quickmerge.patch")
        if not getattr(model.transformer, "batch_first", False):
            raise TypeError("quickmerge.patch needs OpenCLIP's batch-first transformer (open_clip_torch 2.29 or "
                            "later; pip install -U 'quickmerge[openclip]')")
        blocks = list(model.transformer.resblocks)
        plain = [b for b in blocks if all(hasattr(b, p) for p in _PARTS) and is_plain_multihead(b.attn)]
        if not blocks or len(plain) != len(blocks):
            raise TypeError(f"{type(model).__name__} has {len(blocks) - len(plain)} of {len(blocks)} blocks that are "
                            "not a ResidualAttentionBlock with a batch-first nn.MultiheadAttention (qk-norm and "
                            "scaled-cosine towers use custom blocks): not supported by quickmerge.patch")
        return blocks

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        hooks: list[Removable] = []
        for i, block in enumerate(blocks):
            hooks.append(block.attn.register_forward_pre_hook(multihead_attention_hook(block.attn, merger, "tower"),
                                                               with_kwargs=True))
            hooks += residual_merge_hooks(block, i, merger, block.ln_2, block.ls_2)
        if hasattr(model, "forward_intermediates"):
            norm = ("normalize_intermediates", lambda: model.ln_post)
            hooks.append(FeatureMaps(model, merger, functools.partial(_grid, model), norm))
        if getattr(model, "pool_type", None) == "avg":
            hooks.append(_WeightedMean(model, merger))
        return hooks


def _grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The patch grid ``(H, W)`` OpenCLIP's own ``forward_intermediates`` reshapes an image's tokens onto."""
    return height // model.patch_size[0], width // model.patch_size[1]


class _WeightedMean(InstanceMethod):
    """Per instance: ``model._global_pool`` averages over the original patches (``pool_type="avg"``), for the
    output of the last pass only (:meth:`BlockMerger.pooling_weights`); the class token is left out, as in
    OpenCLIP's own mean. Where ``ln_post`` norms every token before the pool (``final_ln_after_pool=False``, the
    default) a call of the tower under ``unmerge="residual"`` (or its ``forward_intermediates``, whose feature maps
    keep the pass's deviations) averages every patch's own residual stream, normed (:class:`.pooling.NormedStreams`);
    otherwise (the pool before the norm, copying) the tokens weighted by their sizes, which for the stream is that
    same mean. ``tokens`` stay merged."""

    def __init__(self, model: nn.Module, merger: BlockMerger) -> None:
        original = model._global_pool

        def averages() -> bool:  # ln_post norms every token, then the pool averages them
            return model.pool_type == "avg" and not getattr(model, "final_ln_after_pool", False)

        streams = NormedStreams(model, model.ln_post, merger, averages)

        @functools.wraps(original)
        def _global_pool(x: Tensor) -> tuple[Tensor, Tensor]:
            weights = merger.pooling_weights(x)
            if weights is None or model.pool_type != "avg":
                return original(x)
            patches = streams.patches(x)
            pooled = mean_by_size(x[:, 1:], weights[:, 1:]) if patches is None else patches[:, 1:].mean(dim=1)
            return pooled, x[:, 1:]

        self.streams = streams
        super().__init__(model, "_global_pool", _global_pool)

    def remove(self) -> None:
        self.streams.remove()
        super().remove()
