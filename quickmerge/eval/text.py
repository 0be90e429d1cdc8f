"""``quickmerge eval text``: continuation perplexity of a real causal LM on a compressed context.

Protocol (NOTES.md): each example is a window of real Wikipedia text, a context of C
tokens and the next T tokens of the same article. The context is prefilled under a
compression method at ratio r (share of entries removed), then the T continuation tokens
are scored by teacher forcing, their positions continuing from C. All methods see the
same examples in one run; perplexity intervals are bootstrap 95% over examples.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import wikipedia_articles


@dataclass
class TextExample:
    """One scored window: ``ids`` holds C + T + 1 tokens (the +1 is the last target)."""

    title: str
    ids: Tensor


def wikipedia_windows(
    tokenizer: Any, count: int, context: int = 1024, continuation: int = 64, *, bos: bool = False
) -> list[TextExample]:
    """The opening C + T + 1 tokens of the first ``count`` articles long enough to hold them."""
    need = context + continuation + 1
    examples = []
    for article in wikipedia_articles():
        ids = tokenizer(article.text, add_special_tokens=False)["input_ids"]
        if bos:
            ids = [tokenizer.bos_token_id, *ids]
        if len(ids) >= need:
            examples.append(TextExample(article.title, torch.tensor(ids[:need])))
        if len(examples) == count:
            return examples
    raise ValueError(
        f"only {len(examples)} Wikipedia articles hold {need} tokens (context {context} + continuation "
        f"{continuation} + 1); ask for fewer examples or shorter windows"
    )


@dataclass
class Method:
    """A compression method: ``make(ratio)`` returns a context-manager factory ``f(model)``.

    ``decode_inside``: keep the method active while the continuation is scored (needed by
    presses that act at decode time); kvpress presses act at prefill only.
    ``eager``: the method needs eager attention (it reads attention weights).
    """

    name: str
    make: Callable[[float], Callable[[Any], contextlib.AbstractContextManager]]
    decode_inside: bool = False
    eager: bool = False


@contextlib.contextmanager
def _attn_implementation(model: Any, name: str) -> Iterator[None]:
    before = model.config._attn_implementation
    if before != name:
        model.set_attn_implementation(name)
    try:
        yield
    finally:
        if before != name:
            model.set_attn_implementation(before)


@torch.no_grad()
def score_example(model: Any, example: TextExample, context: int, press: Any, method: Method) -> dict[str, float]:
    """NLL per continuation token, wall times and the achieved ratio for one example."""
    from transformers import DynamicCache

    ids = example.ids[None]
    ctx, cont, target = ids[:, :context], ids[:, context:-1], ids[:, context + 1 :]
    cache = DynamicCache()
    manager = press(model) if press is not None else contextlib.nullcontext()
    with _attn_implementation(model, "eager") if method.eager else contextlib.nullcontext():
        with manager:
            start = time.perf_counter()
            model.model(input_ids=ctx, past_key_values=cache)
            prefill = time.perf_counter() - start
            kept = cache.get_seq_length()
            positions = torch.arange(context, context + cont.shape[1])[None]
            if method.decode_inside:
                start = time.perf_counter()
                logits = model(input_ids=cont, past_key_values=cache, position_ids=positions).logits
                decode = time.perf_counter() - start
        if not method.decode_inside:
            start = time.perf_counter()
            logits = model(input_ids=cont, past_key_values=cache, position_ids=positions).logits
            decode = time.perf_counter() - start
    nll = F.cross_entropy(logits[0].float(), target[0]).item()
    return {"nll": nll, "prefill_s": prefill, "decode_s": decode, "achieved_ratio": 1 - kept / context}
