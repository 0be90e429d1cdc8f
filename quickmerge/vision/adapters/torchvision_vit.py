"""torchvision ``VisionTransformer`` adapter (``torchvision.models.vit_b_16`` and kin, SWAG weights included).

``EncoderBlock.forward`` is ``x = input + dropout(self_attention(ln_1(input)))`` then ``x + mlp(ln_2(x))``,
its attention a batch-first ``torch.nn.MultiheadAttention``:

- the attention's pre-hook (:mod:`.multihead`) computes what the merge reads of the queries and keys from the
  module's ``in_proj`` weights and passes log(size) as its mask;
- ``ln_2``, ``mlp`` and the block: the residual merge of :mod:`.residual`.

The model reads its class token (``x[:, 0]``), which is never merged, so its head needs nothing more.
"""

from __future__ import annotations

from torch import nn

from .multihead import is_plain_multihead, multihead_attention_hook
from .protocol import BlockMerger, Removable
from .residual import residual_merge_hooks

_MODULE = "torchvision.models.vision_transformer"
_PARTS = ("ln_1", "self_attention", "ln_2", "mlp")


class TorchvisionViTAdapter:
    """torchvision ``VisionTransformer`` (``torchvision.models.vision_transformer``); its class token is kept."""

    name = "torchvision VisionTransformer"
    tested_classes = ("VisionTransformer",)

    def matches(self, model: nn.Module) -> bool:
        return any(c.__module__ == _MODULE and c.__name__ == "VisionTransformer" for c in type(model).__mro__)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # torchvision prepends one class token and classifies from it

    def has_class_token(self, model: nn.Module) -> bool:
        return True

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return False  # torchvision's ViT has no activation checkpointing

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        blocks = list(getattr(getattr(model, "encoder", None), "layers", None) or [])
        plain = [b for b in blocks if all(hasattr(b, p) for p in _PARTS) and is_plain_multihead(b.self_attention)]
        if not blocks or len(plain) != len(blocks):
            raise TypeError(f"{type(model).__name__} has {len(blocks) - len(plain)} of {len(blocks)} encoder layers "
                            f"that are not an EncoderBlock with {', '.join(_PARTS)} and a batch-first "
                            "nn.MultiheadAttention: not supported by quickmerge.patch")
        return blocks

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        hooks: list[Removable] = []
        for i, block in enumerate(blocks):
            hook = multihead_attention_hook(block.self_attention, merger, "model")
            hooks.append(block.self_attention.register_forward_pre_hook(hook, with_kwargs=True))
            hooks += residual_merge_hooks(block, i, merger, block.ln_2, block.mlp)
        return hooks
