"""Heads that read every patch token inside the model's own forward get the tokens back on the patch grid.

Some Hugging Face heads take the base model's ``last_hidden_state`` and, in the same forward, average its patch
tokens (CLIP / SigLIP / SigLIP 2 and DINOv2 classifiers) or reshape them onto the grid (ViT / DeiT masked image
modeling): no hook reaches between the two. Within the head's call the base model's output comes back on the
pass's input positions (:meth:`~quickmerge.vision.patch.MergeHandle.expand_to_patches`). With the handle's
``unmerge="residual"`` (the default) every patch gets its own residual stream back (the token it was merged into
plus what it lost at each merge): where the base model norms its output, the stream is expanded where the final
norm receives it and normed after, as the model's code norms it; with ``"copy"`` every patch carries its token, so
a mean over patches is the size-weighted mean of the tokens. The base model called on its own still returns its
merged tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .pooling import pools_own_streams
from .protocol import BlockMerger, Removable


def unmerged_within_call(model: nn.Module, base: nn.Module, merger: BlockMerger, *, pools: bool = True,
                         before: Callable[[tuple, dict], None] | None = None,
                         norm: nn.Module | None = None) -> list[Removable]:
    """Hooks expanding ``base``'s output tokens while ``model`` (the head around it) runs.

    ``pools``: the head averages the tokens, so with ``size_weighted_pool=False`` they stay merged (it averages
    them as they are); a head that reshapes them onto the grid (``pools=False``) always gets them unmerged.
    ``before(args, kwargs)`` runs first in each call of ``model``, to refuse a call that cannot be served.
    ``norm``: ``base``'s final norm, when its output is normed: with ``unmerge="residual"`` the stream is expanded
    with each patch's deviations where the norm receives it (``expand_to_patches(..., residual=True)``; for a
    pooling head where :func:`.pooling.pools_own_streams`) and the norm runs on every patch; a head reading
    every patch of a base model without a final norm (``pools=False``, no ``norm``: its output is the stream) gets
    the output expanded with the deviations. Otherwise (copying, or a head averaging the stream itself, whose
    size-weighted mean needs none) the output is expanded, each patch carrying its token."""
    state: dict[str, Any] = {"inside": False, "reader": None, "normed": False}

    def model_pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        if before is not None:
            before(args, kwargs)
        state["inside"], state["normed"] = True, False
        if (norm is not None and pools_own_streams(merger)) if pools else merger.unmerge == "residual":
            state["reader"] = merger.dense_head()  # this pass keeps the deviations

    def model_post(_m: nn.Module, _args: tuple, _kwargs: dict, _out: Any) -> None:
        state["inside"] = False
        reader, state["reader"] = state["reader"], None
        if reader is not None:
            reader.remove()

    def norm_pre(_m: nn.Module, args: tuple) -> tuple | None:
        if state["reader"] is None:  # opened only inside the head's call, with the residual unmerge
            return None
        state["normed"] = True
        expanded = merger.expand_to_patches(args[0], residual=True)
        return None if expanded is None else (expanded, *args[1:])

    def base_post(_m: nn.Module, _args: tuple, out: Any) -> Any:
        if not state["inside"] or (pools and not merger.size_weighted_pool):
            return None
        if state["reader"] is not None and norm is None:  # the output is the residual stream itself
            expanded = merger.expand_to_patches(out.last_hidden_state, residual=True)
            if expanded is None:
                return None
            out.last_hidden_state = expanded
            return out
        if state["reader"] is not None:
            if not state["normed"] and merger.sizes is not None:  # the hook above never ran: a renamed norm
                raise RuntimeError(f"{type(base).__name__} returned its output without calling {type(norm).__name__}"
                                   ", where quickmerge puts the residual stream back on the patch grid: set "
                                   "handle.unmerge = 'copy', or report this transformers release")
            return None
        expanded = merger.expand_to_patches(out.last_hidden_state)
        if expanded is None:
            return None
        out.last_hidden_state = expanded
        return out

    hooks = [model.register_forward_pre_hook(model_pre, with_kwargs=True),
             model.register_forward_hook(model_post, with_kwargs=True, always_call=True),  # also after a raise
             # first among the base's forward hooks, so any other (a user's) sees what the head reads
             base.register_forward_hook(base_post, prepend=True)]
    if norm is not None:
        hooks.append(norm.register_forward_pre_hook(norm_pre, prepend=True))
    return hooks
