"""Hooks that merge a pre-norm block's residual stream between its attention and its MLP.

For blocks written ``h = x + attn_branch(x)`` then ``return h + mlp_branch(norm(h))`` (timm's
``Block``, Hugging Face's ``Dinov2Layer``): the ``norm`` pre-hook merges ``h``, so the MLP
runs on fewer tokens; the hook on the branch's last module keeps the branch output and
hands the block a zero, because the block's own residual add still holds the unmerged
``h``; the block's hook returns merged ``h`` + branch. The block's code runs unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn


def residual_merge_hooks(
    block: nn.Module, index: int, handle: Any, norm: nn.Module, branch_end: nn.Module
) -> list[Any]:
    """Register the hooks on ``block`` (layer ``index`` of ``handle``'s model); returns their handles."""
    state: dict[str, Tensor | None] = {"residual": None, "branch": None}

    def block_pre(_m: nn.Module, args: tuple) -> None:
        if index == 0:
            handle.begin(args[0])
        handle.enter_block(args[0])
        state["residual"] = state["branch"] = None

    def norm_pre(_m: nn.Module, args: tuple) -> tuple | None:
        merged = handle.merge(index, args[0])
        if merged is None:
            return None
        state["residual"] = merged
        return (merged,)

    def branch_hook(_m: nn.Module, _args: tuple, out: Tensor) -> Tensor | None:
        if state["residual"] is None:
            return None
        state["branch"] = out
        return out.new_zeros(())

    def block_hook(_m: nn.Module, _args: tuple, _out: Any) -> Tensor | None:
        result = None
        if state["residual"] is not None:
            result = state["residual"] + state["branch"]
            state["residual"] = state["branch"] = None
        if index == handle.num_layers - 1:
            handle.end()
        return result

    return [
        block.register_forward_pre_hook(block_pre),
        norm.register_forward_pre_hook(norm_pre),
        branch_end.register_forward_hook(branch_hook),
        block.register_forward_hook(block_hook),
    ]
