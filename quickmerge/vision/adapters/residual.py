"""Hooks that merge a pre-norm block's residual stream between its attention and its MLP.

For blocks written ``h = x + attn_branch(x)`` then ``return h + mlp_branch(norm(h))`` (timm's
``Block``, Hugging Face's ``Dinov2Layer``): the ``norm`` pre-hook merges ``h``, so the MLP
runs on fewer tokens; the hook on the branch's last module keeps the branch output and
hands the block a zero, because the block's own residual add still holds the unmerged
``h``; the block's hook returns merged ``h`` + branch. The block's code runs unchanged.
The branch hook is kept last among the branch's forward hooks (moved there as each block starts),
so a hook a user registers there after patching still sees the branch's output, not the zero.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .protocol import BlockMerger, Removable


def block_start_hook(block: nn.Module, index: int, merger: BlockMerger, on_start: Any = None) -> Removable:
    """Pre-hook on ``block`` telling ``merger`` that a pass (index 0) and this block begin; then ``on_start()``."""

    def block_pre(_m: nn.Module, args: tuple) -> None:
        if index == 0:
            merger.begin(args[0])
        merger.enter_block(args[0])
        if on_start is not None:
            on_start()

    return block.register_forward_pre_hook(block_pre)


def block_end_hook(block: nn.Module, index: int, merger: BlockMerger) -> Removable:
    """Hook on ``block`` telling ``merger`` that the pass ended (after the last block).

    Register it after every hook that replaces the block's output.
    """

    def block_post(_m: nn.Module, _args: tuple, _out: Any) -> None:
        if index == merger.num_layers - 1:
            merger.end()

    return block.register_forward_hook(block_post)


def norm_merge_hook(norm: nn.Module, index: int, merger: BlockMerger, state: dict[str, Tensor | None]) -> Removable:
    """Pre-hook on the block's second ``norm``: merge the residual stream there and keep it in
    ``state["residual"]`` (the block's own code still holds the unmerged stream)."""

    def norm_pre(_m: nn.Module, args: tuple) -> tuple | None:
        merged = merger.merge(index, args[0])
        if merged is None:
            return None
        state["residual"] = merged
        return (merged,)

    return norm.register_forward_pre_hook(norm_pre)


def residual_merge_hooks(
    block: nn.Module, index: int, merger: BlockMerger, norm: nn.Module, branch_end: nn.Module
) -> list[Removable]:
    """Register the hooks on ``block`` (layer ``index`` of ``merger``'s model); returns their handles."""
    state: dict[str, Tensor | None] = {"residual": None, "branch": None}

    def start() -> None:
        state["residual"] = state["branch"] = None
        # hooks run in registration order: one registered after patching would otherwise get the zero.
        # (Reordering is skipped while compiling: a traced hook may not edit its module's hook table.)
        hooks = branch_end._forward_hooks
        if not torch.compiler.is_compiling() and next(reversed(hooks)) != branch.id:
            hooks.move_to_end(branch.id)

    def branch_hook(_m: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
        if state["residual"] is None:
            return None
        state["branch"] = out
        return out.new_zeros(())

    def block_hook(_m: nn.Module, _args: tuple, _out: Any) -> Tensor | None:
        if state["residual"] is None:
            return None
        result = state["residual"] + state["branch"]
        state["residual"] = state["branch"] = None
        return result

    branch = branch_end.register_forward_hook(branch_hook)
    return [
        block_start_hook(block, index, merger, on_start=start),
        norm_merge_hook(norm, index, merger, state),
        branch,
        # first among the block's forward hooks: any other (transformers' recorder of hidden states, a user's)
        # sees the merged output, not the block's own sum, which lacks the MLP branch
        block.register_forward_hook(block_hook, prepend=True),
        block_end_hook(block, index, merger),
    ]
