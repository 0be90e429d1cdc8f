"""Forward hooks and ``torch.compile``: a compiled graph must never run a model whose hooks changed.

By default TorchDynamo does not guard on ``nn.Module`` hooks
(``torch._dynamo.config.skip_nnmodule_hook_guards``, a speed option): a graph compiled before a model
was patched keeps running after :func:`quickmerge.patch` without merging anything, and a patched copy of
a model whose unpatched twin was compiled reuses the twin's graph. Nothing fails; the tokens are
simply not merged. :func:`guard_hooks` turns hook guards on before quickmerge registers any hook, and
clears the graphs compiled without them once, so every compiled model is retraced with its hooks.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch


def guard_hooks() -> None:
    """Make TorchDynamo guard compiled graphs on module hooks; reset its caches the first time.

    A no-op once done in this process (unless the flag was turned back). When graphs had been compiled
    without hook guards, :func:`torch.compiler.reset` clears them (every compiled model, quickmerge's or
    not, is traced again on its next call) and a warning says so.
    """
    import torch._dynamo as dynamo  # timm and transformers import it already; ~1 s otherwise
    if not getattr(dynamo.config, "skip_nnmodule_hook_guards", False):
        return  # already guarding (or a release without the option; tests/test_compile_guard.py checks the behaviour)
    dynamo.config.skip_nnmodule_hook_guards = False
    compiled = _graphs_compiled(dynamo)
    if compiled:
        torch.compiler.reset()
        count = f"{compiled} graph(s)" if compiled > 0 else "all graphs"
        warnings.warn(
            f"quickmerge cleared torch.compile's caches ({count}): they were compiled without guards "
            "on module hooks, so a compiled model would have ignored quickmerge's hooks. Compiled models are "
            "traced again on their next call; patch before compiling to avoid this.",
            stacklevel=3,
        )


def _graphs_compiled(dynamo: ModuleType) -> int:
    """Graphs TorchDynamo compiled in this process so far (its own counter; -1 if it has none)."""
    try:
        return int(dynamo.utils.counters["stats"]["unique_graphs"])
    except (AttributeError, KeyError, TypeError):
        return -1  # unknown: reset to be safe
