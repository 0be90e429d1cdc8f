"""Rotary position embeddings for merged tokens (ViTs that rotate queries and keys by patch position).

A RoPE ViT (timm's ``Eva``: EVA-02, DINOv3, RoPE-ViT, ...; Hugging Face ``DINOv3ViTModel``) computes
one rotary table per patch, sin and cos ``[N0, D]`` (or ``[H, N0, D]`` per head), once per forward pass,
and hands it to every block. After a merge a block has fewer tokens than the table has rows: the
block's pre-hook swaps the table for the merged tokens' one (:meth:`MergeHandle.mean_over_patches`),
each merged token turned by the mean of its patches' rotations. A rotation is linear in sin and cos,
so a query's logit with a merged key is the mean of its logits with that key's content at each of its
patches' positions; a token that stands for one patch keeps its own rotation exactly.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ...call_arguments import CallArgument, takes_argument
from .protocol import BlockMerger, Removable


def check_takes_table(blocks: list[nn.Module], name: str) -> None:
    """Raise TypeError (before any hook) unless every block's forward takes the rotary table ``name``: a release that
    renamed it must not leave the table unmerged."""
    missing = [i for i, block in enumerate(blocks) if not takes_argument(block, name)]
    if missing:
        raise TypeError(f"block {missing[0]} ({type(blocks[missing[0]]).__name__}) takes no {name!r}, the rotary "
                        "table quickmerge merges with the tokens")


def rotary_table_hook(block: nn.Module, name: str, merger: BlockMerger,
                      state: dict[str, Any] | None = None) -> Removable:
    """Pre-hook on ``block`` replacing its argument ``name`` (a per-patch table, or a tuple of them such as
    ``(cos, sin)``), by keyword or by position, with the current tokens' table; kept in ``state["table"]``
    when given (for hooks that rotate the captured queries and keys themselves).

    Register it after the hook whose ``merger.begin`` starts the pass (hooks run in registration order)."""

    argument = CallArgument.of(block, name)

    def block_pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
        table = argument.get(args, kwargs)
        if isinstance(table, tuple):
            table = tuple(merger.mean_over_patches(t) for t in table)
        elif isinstance(table, Tensor):
            table = merger.mean_over_patches(table)
        if state is not None:
            state["table"] = table
        return (args if table is None else argument.replace(args, kwargs, table)), kwargs

    return block.register_forward_pre_hook(block_pre, with_kwargs=True)
