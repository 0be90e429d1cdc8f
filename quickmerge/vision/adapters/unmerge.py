"""Heads that read every patch token inside the model's own forward get the tokens back on the patch grid.

Some Hugging Face heads take the base model's ``last_hidden_state`` and, in the same forward, average its patch
tokens (CLIP / SigLIP / SigLIP 2 and DINOv2 classifiers) or reshape them onto the grid (ViT / DeiT masked image
modeling): no hook reaches between the two. Within the head's call, a forward hook on the base model expands its
output to the pass's input positions (:meth:`~quickmerge.vision.patch.MergeHandle.expand_to_patches`: every patch
carries the token it was merged into), so a mean over patches is the size-weighted mean over the original patches
and a reshape finds every patch. The base model called on its own still returns its merged tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .protocol import BlockMerger, Removable


def unmerged_within_call(model: nn.Module, base: nn.Module, merger: BlockMerger, *, pools: bool = True,
                         before: Callable[[tuple, dict], None] | None = None) -> list[Removable]:
    """Hooks expanding ``base``'s output tokens while ``model`` (the head around it) runs.

    ``pools``: the head averages the tokens, so with ``size_weighted_pool=False`` they stay merged (it averages
    them as they are); a head that reshapes them onto the grid (``pools=False``) always gets them unmerged.
    ``before(args, kwargs)`` runs first in each call of ``model``, to refuse a call that cannot be served."""
    state = {"inside": False}

    def model_pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if before is not None:
            before(args, kwargs)
        state["inside"] = True

    def model_post(_m: nn.Module, _args: tuple, _kwargs: dict, _out: Any) -> None:
        state["inside"] = False

    def base_post(_m: nn.Module, _args: tuple, out: Any) -> Any:
        if not state["inside"] or (pools and not merger.size_weighted_pool):
            return None
        expanded = merger.expand_to_patches(out.last_hidden_state)
        if expanded is None:
            return None
        out.last_hidden_state = expanded
        return out

    return [model.register_forward_pre_hook(model_pre, with_kwargs=True),
            model.register_forward_hook(model_post, with_kwargs=True, always_call=True),  # also after a raise
            # first among the base's forward hooks, so any other (a user's) sees what the head reads
            base.register_forward_hook(base_post, prepend=True)]
