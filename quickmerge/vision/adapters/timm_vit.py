"""timm ``VisionTransformer`` adapter (timm 1.0.16 and later: ``Attention.forward`` takes ``attn_mask``).

timm's ``Block.forward`` is ``x = x + drop_path1(ls1(attn(norm1(x))))`` then
``x = x + drop_path2(ls2(mlp(norm2(x))))``. Hooks sit between those pieces, so LayerScale,
qk-norm and fused SDPA are the model's own code:

- ``attn`` pre-hook: passes log(size) as ``attn_mask`` (proportional attention);
- ``attn.q_norm`` / ``attn.k_norm`` hooks: capture queries and keys ``[B, H, N, hd]``;
- ``norm2``, ``drop_path2`` and the block: the residual merge of :mod:`.residual`
  (norm2 and the MLP run on fewer tokens; the block returns the merged stream).

Average pooling (``global_pool="avg"`` / ``"avgmax"``) takes the mean over the original patches: the instance's
``pool`` wraps timm's, and reads every patch's own residual stream, normed (``unmerge="residual"``, where the final
norm comes before the pool), or weights each token by its size (ToMe does so for MAE models); attention pooling
(``"map"``) gets log(size) as its mask.

``forward_intermediates`` (and what calls it: ``get_intermediate_layers(reshape=True)``, ``features_only=True``
models) reshapes each block's tokens onto the patch grid: while the handle merges, the instance's method unmerges
them first (:class:`.instance.FeatureMaps`: every patch carries the token it was merged into at that block);
``output_fmt="NLC"`` returns each block's merged tokens as they are.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .instance import FeatureMaps, InstanceMethod
from .pooling import NormedStreams, pool_by_size
from .protocol import BlockMerger, Removable
from .residual import residual_merge_hooks

_REQUIRED = ("norm1", "attn", "norm2", "mlp", "drop_path2")


class TimmViTAdapter:
    """timm ``VisionTransformer`` and its subclasses (class and register tokens kept)."""

    name = "timm VisionTransformer"
    tested_classes = ("VisionTransformer", "VisionTransformerDistilled")  # the latter: DeiT's distillation token

    def matches(self, model: nn.Module) -> bool:
        return any(c.__module__ == "timm.models.vision_transformer" and c.__name__ == "VisionTransformer"
                   for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(getattr(model, "num_prefix_tokens", 1))

    def has_class_token(self, model: nn.Module) -> bool:
        return getattr(model, "cls_token", None) is not None  # timm puts it first, before register tokens

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return bool(getattr(model, "grad_checkpointing", False))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return pre_norm_blocks(model)

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        hooks: list[Removable] = []
        for i, block in enumerate(blocks):
            hooks += attach_block(block, i, merger)
        if hasattr(model, "forward_intermediates"):
            hooks.append(FeatureMaps(model, merger, functools.partial(timm_grid, model), ("norm", lambda: model.norm)))
        if callable(getattr(model, "pool", None)) and isinstance(getattr(model, "norm", None), nn.Module):
            hooks.append(WeightedPool(model, merger))
        return hooks


def pre_norm_blocks(model: nn.Module) -> list[nn.Module]:
    """``model.blocks`` if every one is a pre-norm timm block quickmerge hooks into (``norm1``, ``attn`` with
    ``q_norm`` / ``k_norm`` and an ``attn_mask`` argument, ``norm2``, ``mlp``, ``drop_path2``); TypeError otherwise."""
    found = [b for b in model.blocks if all(hasattr(b, a) for a in _REQUIRED)
             and hasattr(b.attn, "q_norm") and hasattr(b.attn, "k_norm")]
    if not found:
        raise TypeError(f"{type(model).__name__} has no timm Block with attn.q_norm/k_norm, norm2, mlp, "
                        "drop_path2 to patch (parallel or post-norm blocks are not supported)")
    if len(found) != len(model.blocks):
        raise TypeError(f"only {len(found)} of {len(model.blocks)} blocks have the structure quickmerge hooks into")
    if "attn_mask" not in inspect.signature(found[0].attn.forward).parameters:
        import timm

        raise TypeError(f"{type(found[0].attn).__name__}.forward of timm {timm.__version__} takes no attn_mask, "
                        "through which proportional attention reaches the logits: quickmerge needs timm >= 1.0.16 "
                        "(pip install -U timm)")
    return found


def timm_grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The patch grid ``(H, W)`` timm's own ``forward_intermediates`` reshapes an image's tokens onto."""
    h, w = model.patch_embed.dynamic_feat_size((height, width))
    return int(h), int(w)


class WeightedPool(InstanceMethod):
    """Per instance: ``model.pool`` averages over the original patches, not over the merged tokens.

    timm's ``global_pool_nlc`` takes ``x[:, num_prefix_tokens:].mean(1)`` (``avgmax``: half that plus half the
    max); a merged token stands for ``size`` patches. With the handle's ``unmerge="residual"`` (default) a call of
    the model keeps its pass's deviations and the pool reads every patch's own residual stream (its token plus what
    it lost at each merge, :meth:`~quickmerge.vision.patch.MergeHandle.expand_to_patches`), normed by the model's
    final ``norm`` as the model's code norms it, then averaged; with ``"copy"`` (or ``forward_head`` called on
    features of a separate ``forward_features`` call, unless the handle's ``keep_deviations`` kept them there) the
    mean of the tokens weighted by their sizes. Attention pooling
    (``global_pool="map"``) gets log(size) as its mask instead. Only the tensor the last pass's final ``norm``
    returned is pooled this way (what ``forward_head`` gets from ``forward_features``); any other input,
    class-token and max pooling are timm's own."""

    def __init__(self, model: nn.Module, merger: BlockMerger, attn_pool_includes_prefix: bool = False) -> None:
        original = model.pool

        def averages() -> bool:  # the head's own pooling reads every patch token: worth the deviations
            return getattr(model, "attn_pool", None) is None and model.global_pool in ("avg", "avgmax")

        streams = NormedStreams(model, model.norm, merger, averages)

        @functools.wraps(original)
        def pool(x: Any, pool_type: str | None = None, *args: Any, **kwargs: Any) -> Any:
            kind = model.global_pool if pool_type is None else pool_type
            attn_pool = getattr(model, "attn_pool", None)
            pools = attn_pool is not None or kind in ("avg", "avgmax")
            ours = pools and x is streams.final.tensor and not args and not kwargs  # other arguments: a newer timm's
            weights = merger.pooling_weights(x) if ours else None
            if weights is None:
                return original(x, pool_type, *args, **kwargs)
            p = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
            patches = streams.patches(x) if attn_pool is None else None
            if patches is not None:  # the pass kept its deviations: the mean of every patch's own stream, normed
                mean = patches[:, p:].mean(dim=1)
                return mean if kind == "avg" else 0.5 * (patches[:, p:].amax(dim=1) + mean)
            # Eva's attention pooling reads every token; the others drop the prefix unless told otherwise
            if attn_pool is None or not attn_pool_includes_prefix:
                x, weights = x[:, p:], weights[:, p:]
            return pool_by_size(x, weights, kind, attn_pool)  # attention pooling: proportional, as in the blocks

        self.streams = streams
        super().__init__(model, "pool", pool)

    def remove(self) -> None:
        self.streams.remove()
        super().remove()


def attach_block(block: nn.Module, layer: int, merger: BlockMerger,
                 rotate: Callable[[Tensor], Tensor] | None = None, eager_mask_refusal: str | None = None,
                 ) -> list[Removable]:
    """Hooks of one timm block: proportional attention through ``attn_mask``, queries and keys captured after
    ``q_norm`` / ``k_norm`` (turned by ``rotate`` first where the attention rotates them after its norms, in a
    pass that needs them), the residual merge before the MLP. ``eager_mask_refusal``: the error to raise where
    the attention's unfused path would read the float mask as something else."""
    attn = block.attn

    def attn_pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        bias = merger.attention_bias(args[0])
        if bias is None:
            return None
        if eager_mask_refusal is not None and not getattr(attn, "fused_attn", True):
            raise ValueError(eager_mask_refusal)
        if kwargs.get("attn_mask") is not None:
            raise ValueError("quickmerge's proportional attention cannot be combined with a user attn_mask")
        return args, {**kwargs, "attn_mask": bias}

    def q_hook(_m: nn.Module, _args: tuple, q: Any) -> None:
        if rotate is not None:
            if not merger.needs_qk():
                return
            q = rotate(q)
        merger.record_qk(q=q, scale=float(attn.scale))

    def k_hook(_m: nn.Module, _args: tuple, k: Any) -> None:
        if rotate is not None:
            if not merger.needs_qk():
                return
            k = rotate(k)
        merger.record_qk(k=k)

    return [
        attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
        attn.q_norm.register_forward_hook(q_hook),
        attn.k_norm.register_forward_hook(k_hook),
        *residual_merge_hooks(block, layer, merger, block.norm2, block.drop_path2),
    ]
