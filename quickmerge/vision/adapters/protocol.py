"""The two interfaces between :func:`quickmerge.patch` and a model family's adapter.

``patch(model)`` walks the registry (``quickmerge.vision.adapters``) for the first
:class:`VisionAdapter` whose ``matches(model)`` is true, asks it for the blocks, and
calls ``attach`` with a :class:`BlockMerger` (the patch's handle). The adapter's hooks
call the merger at fixed points of every block's forward pass:

1. ``begin(x)`` at the start of the first block, ``enter_block(x)`` at each block's start;
   for a batch padded to one length, ``set_padding(valid)`` right after ``begin``;
2. ``attention_bias(x)`` for the additive mask of the block's attention (proportional
   attention; with padding it masks the padding and replaces the model's own mask,
   ``has_padding()``), and ``record_qk(q, k, scale)`` with the attention's queries and keys;
3. ``merge(layer, x)`` on the residual stream after attention, before the MLP (it returns
   the merged stream, or None when nothing merges); the block must then carry on with it;
4. ``mean_over_patches(table)`` for a block's rotary table (models with rotary position
   embeddings, :mod:`.rotary`): one row per current token, the mean of its patches' rows;
5. ``end()`` after the last block (``end_open_pass()`` where a caller stopped early); then
   ``pooling_weights(x)`` or ``expand_to_patches(x)`` for a head that averages the output tokens or needs
   them on the patch grid.

Hooks go between the model's own pieces (never a copied forward, never a class swap) and
are removed by calling ``remove()`` on what ``attach`` returned.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn


class Removable(Protocol):
    """A hook handle, or anything else that undoes one change to the model."""

    def remove(self) -> None: ...


class BlockMerger(Protocol):
    """What a patched model's handle offers its adapter's hooks (see the module docstring)."""

    num_layers: int
    num_prefix_tokens: int  # tokens at the front that are never merged
    prop_attn: bool  # whether attention_bias adds log(size) (may change between passes)
    padded: bool  # whether the last finished pass had padding (its sizes are 0 there)
    size_weighted_pool: bool  # whether heads that pool the last tokens weight them by size
    unmerge: str  # "residual" or "copy": how a dense head's reader puts tokens back on the patch grid
    tokens_per_layer: list[int]  # tokens entering each block in the last pass
    sizes: Tensor | None  # [B, N] patches per output token of the last pass (None: nothing merged)

    def begin(self, x: Tensor) -> None: ...

    def enter_block(self, x: Tensor) -> None: ...

    def set_padding(self, valid: Tensor) -> None:
        """``valid [B, N]`` (bool, False = padding) for the first block's tokens; right after ``begin``."""
        ...

    def has_padding(self) -> bool:
        """Whether this pass masks padding (``attention_bias`` then replaces the model's mask)."""
        ...

    def attention_bias(self, x: Tensor) -> Tensor | None: ...

    def record_qk(self, q: Tensor | None = None, k: Tensor | None = None, scale: float | None = None) -> None: ...

    def merge(self, layer: int, x: Tensor) -> Tensor | None: ...

    def merges(self) -> bool:
        """Whether the current settings merge any token (False: the model runs exactly as unpatched)."""
        ...

    def drops(self) -> bool:
        """Whether the current method drops tokens rather than merging them (their patches have no stream left)."""
        ...

    def needs_qk(self) -> bool:
        """Whether this pass needs the attention's queries and keys (it merges, or a calibration observes
        them); an adapter that must recompute them (OpenCLIP's fused attention) can skip the work otherwise."""
        ...

    def attention_reads(self) -> str:
        """What of the attention ``record_qk`` must hold this pass: ``"all"``, ``"class_query"``,
        ``"class_logits"``, ``"mean_keys"`` or ``"none"`` (see :meth:`quickmerge.vision.patch.MergeHandle.
        attention_reads`); an adapter that projects queries and keys itself projects only that."""
        ...

    def pooling_weights(self, x: Tensor) -> Tensor | None:
        """Weights ``[B, N]`` for a head that averages the last block's tokens ``x [B, N, C]``, or None."""
        ...

    def expand_to_patches(self, x: Tensor, stage: int | None = None, residual: bool = False) -> Tensor | None:
        """The last pass's tokens ``x [B, N, C]`` entering block ``stage`` (default: the last block's output) back
        on its ``N0`` input positions (each patch the row of its token; with ``residual`` plus what its own stream
        lost at each merge before, ``x`` then the residual stream itself), ``[B, N0, C]``, for a head that needs
        every patch (a mean in the model's own forward, a feature map); None when nothing merged."""
        ...

    def kept_deviations(self) -> bool:
        """Whether the last pass kept what ``expand_to_patches(..., residual=True)`` reads (False: nothing merged)."""
        ...

    def dense_head(self) -> Removable:
        """Declare a reader that unmerges every pass onto the patch grid (a backbone's head; a feature-map call,
        while it runs): passes keep what ``expand_to_patches(..., residual=True)`` needs. ``remove()`` closes it."""
        ...

    def mean_over_patches(self, table: Tensor) -> Tensor:
        """A per-patch table ``[..., N0, D]`` (a rotary embedding's sin / cos) for the current tokens,
        ``[B, H or 1, N, D]``, each row the mean of its patches' rows; the table itself before any merge."""
        ...

    def end(self) -> None: ...

    def end_open_pass(self) -> None:
        """End a pass that stopped before its last block (a caller that runs only the first blocks, as
        ``forward_intermediates(stop_early=True)``), so ``expand_to_patches`` reads it; nothing if none is open."""
        ...


class VisionAdapter(Protocol):
    """One model family's way into :func:`quickmerge.patch`.

    Attributes:
        name: the family, as error messages show it (``"timm VisionTransformer"``).
        tested_classes: class names tested exactly; other matching subclasses get a warning.
    """

    name: str
    tested_classes: tuple[str, ...]

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model`` belongs to this family (by class, without importing the family's library)."""
        ...

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens at the front that are never merged (class and register tokens)."""
        ...

    def has_class_token(self, model: nn.Module) -> bool:
        """Whether the first prefix token is a class token (whose query QuickMerge++ asks for saliency)."""
        ...

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        """Whether the model recomputes its blocks in the backward pass (a patched model refuses to train so)."""
        ...

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks to hook, in order; raises TypeError if their structure is not supported."""
        ...

    def attach(self, model: nn.Module, blocks: list[nn.Module], merger: BlockMerger) -> list[Removable]:
        """Register the hooks; returns everything to ``remove()`` to restore the model exactly."""
        ...
