"""Retrieval tasks, where eviction can lose what the continuation needs (the text protocol's
second part): a passkey inserted once in a long Wikipedia context, and a passage repeated.

Passkey: a random 5-digit key is inserted once at a random depth of a 1k-4k-token Wikipedia
context, in one of two needles: ``"landmark"`` (Landmark attention's passkey test, the key in two
sentences: "The pass key is 12345. Remember it. 12345 is the pass key.") or ``"once"`` (the key stated
a single time: "The pass key is 12345. Remember it."). The context is compressed without the
question (kvpress's query-agnostic setting), then the question is fed and the answer
decoded greedily; a trial counts when the first five digits of the answer are the key.

Repeated passage: a 65-token passage of one article is placed at a random depth of another
article's text; the continuation to score is the same passage again, so predicting it well
needs the earlier copy. Two window sets: ``"openings"`` (one window per article, from the articles'
openings) and ``"later"`` (the articles' later text, cut into chunks; no text of an openings window).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data import wikipedia_articles
from ..text.cache import cache_kwargs
from .text import Method, TextExample, prefilled

NEEDLES = {
    "landmark": " The pass key is {key}. Remember it. {key} is the pass key. ",
    "once": " The pass key is {key}. Remember it. ",
}
NEEDLE = NEEDLES["landmark"]
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    """Context ids ``[C]`` holding the needle, question ids ``[Q]``, the key and where it was put."""

    title: str
    context: Tensor
    question: Tensor
    key: str
    depth: float


def _filler(tokenizer: Any, need: int, start: int) -> tuple[list[int], str]:
    """At least ``need`` token ids of consecutive articles from the ``start``-th on, and the first title."""
    articles = wikipedia_articles()
    ids: list[int] = []
    first = articles[start % len(articles)].title
    i = start
    while len(ids) < need:
        ids += tokenizer(articles[i % len(articles)].text + "\n\n", add_special_tokens=False)["input_ids"]
        i += 1
        if i - start > len(articles):
            raise ValueError(f"the Wikipedia articles hold fewer than {need} tokens")
    return ids[:need], first


def passkey_trials(tokenizer: Any, count: int, *, min_context: int = 1024, max_context: int = 4096,
                   bos: bool = False, seed: int = 0, needle: str = "landmark", first: int = 0) -> list[PasskeyTrial]:
    """Trials ``first .. first + count - 1``: length uniform in [min_context, max_context], depth uniform in
    [0.05, 0.95].

    ``needle``: a key of :data:`NEEDLES`. The same seed gives the same keys, depths and lengths for either needle;
    a trial depends on its number and the seed only (``first`` = 100 gives trials 100.. of a 200-trial run).
    """
    if not 1 <= min_context <= max_context:
        raise ValueError(f"need 1 <= min_context <= max_context, got {min_context}, {max_context}")
    if needle not in NEEDLES:
        raise ValueError(f"needle must be one of {sorted(NEEDLES)}, got {needle!r}")
    if first < 0:
        raise ValueError(f"first must be 0 or more, got {first}")
    gen = torch.Generator().manual_seed(seed)
    question = torch.tensor(tokenizer(QUESTION, add_special_tokens=False)["input_ids"])
    trials = []
    for t in range(first + count):
        length = int(torch.randint(min_context, max_context + 1, (1,), generator=gen))
        depth = 0.05 + 0.9 * float(torch.rand(1, generator=gen))
        key = f"{int(torch.randint(10_000, 100_000, (1,), generator=gen))}"
        if t < first:
            continue  # drawn all the same, so that trial t is the same whatever ``first`` is
        stated = tokenizer(NEEDLES[needle].format(key=key), add_special_tokens=False)["input_ids"]
        head = [tokenizer.bos_token_id] if bos else []
        filler, title = _filler(tokenizer, length - len(stated) - len(head), start=7 * t)
        cut = int(depth * len(filler))
        ids = head + filler[:cut] + stated + filler[cut:]
        trials.append(PasskeyTrial(f"{t}:{title}", torch.tensor(ids), question, key, depth))
    return trials


@torch.no_grad()
def answer_passkey(model: Any, tokenizer: Any, trial: PasskeyTrial, press: Any, method: Method,
                   new_tokens: int = 16) -> dict[str, Any]:
    """Compress the context, feed the question one token at a time, decode greedily; exact match of the key."""
    device = next(model.parameters()).device
    ctx = trial.context[None].to(device)
    answer: list[int] = []
    with prefilled(model, ctx, press, method) as state:
        position = ctx.shape[1]
        logits = None
        for token in trial.question.tolist():  # one per call: the masking presses need it
            logits = model(input_ids=torch.tensor([[token]], device=device), **cache_kwargs(model, state.cache),
                           position_ids=torch.tensor([[position]], device=device)).logits
            position += 1
        for _ in range(new_tokens):
            nxt = int(logits[0, -1].argmax())
            answer.append(nxt)
            logits = model(input_ids=torch.tensor([[nxt]], device=device), **cache_kwargs(model, state.cache),
                           position_ids=torch.tensor([[position]], device=device)).logits
            position += 1
    text = tokenizer.decode(answer)
    return {"correct": float(matches_key(text, trial.key)), "answer": text, "depth": trial.depth,
            "context": int(trial.context.numel())}


def matches_key(answer: str, key: str) -> bool:
    """Exact match: the first digits of the answer, as many as the key has, are the key."""
    digits = re.findall(r"\d", answer)
    return "".join(digits[: len(key)]) == key


REPEATED_SOURCES = ("openings", "later")
_CHUNKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {size: chunks}: tokenized once


def repeated_window_count(source: str = "openings", tokenizer: Any = None, context: int = 1024,
                          *, bos: bool = False) -> int:
    """How many distinct repeated-passage windows ``source`` holds. ``"openings"``: window i starts its filler at
    article 11 i (mod the article count), so one per article. ``"later"``: one per chunk of
    :func:`later_chunks` (needs the tokenizer: chunks are counted in tokens)."""
    if source == "openings":
        return len(wikipedia_articles())
    if source == "later":
        if tokenizer is None:
            raise ValueError("repeated_window_count: the 'later' windows are counted in tokens: pass the tokenizer")
        return len(later_chunks(tokenizer, context - int(bos)))
    raise ValueError(f"source must be one of {REPEATED_SOURCES}, got {source!r}")


def later_chunks(tokenizer: Any, size: int) -> list[tuple[int, int, list[int]]]:
    """Every whole ``size``-token chunk of each article's text after its first chunk, as ``(part, article,
    ids)``, ordered by part, then by article (dump order). The first chunk of an article holds everything an
    ``"openings"`` window of the same size takes from it (its filler start and the passage), so these chunks share
    no text with those windows."""
    cached = _CHUNKS.setdefault(tokenizer, {})
    if size in cached:
        return cached[size]
    texts = [article.text + "\n\n" for article in wikipedia_articles()]
    chunks = []
    for a, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):  # one batch: fast tokenizers
        chunks += [(part, a, ids[part * size : (part + 1) * size]) for part in range(1, len(ids) // size)]
    cached[size] = sorted(chunks, key=lambda c: (c[0], c[1]))
    return cached[size]


def repeated_passage_windows(tokenizer: Any, count: int, context: int = 1024, continuation: int = 64,
                             *, bos: bool = False, seed: int = 0, first: int = 0,
                             source: str = "openings") -> list[TextExample]:
    """Windows ``first .. first + count - 1`` whose continuation (``continuation + 1`` tokens of another article)
    already appeared in the context. A window's content depends on its number, ``seed`` and ``source`` only,
    never on ``first`` or ``count``. Asking past :func:`repeated_window_count` raises instead of repeating
    windows.

    ``source="openings"``: window i's filler opens article 11 i, its passage opens article 11 i + 5 (the two
    may run into the next articles). ``source="later"``: window i's filler is the head of chunk i of
    :func:`later_chunks`, its passage the tail of the next chunk in that order, so no two windows share text;
    where that chunk is of the same article (only among the last chunks of the longest articles: 2 of 515
    windows with SmolLM2 at C = 1024) the first chunk after it of another article.
    """
    if source not in REPEATED_SOURCES:
        raise ValueError(f"source must be one of {REPEATED_SOURCES}, got {source!r}")
    head = [tokenizer.bos_token_id] if bos else []
    passage_len = continuation + 1
    if context - len(head) <= passage_len:
        raise ValueError(f"context must exceed continuation + 1 (+ BOS), got {context} and {continuation}")
    chunks = later_chunks(tokenizer, context - len(head)) if source == "later" else []
    distinct = len(chunks) if source == "later" else repeated_window_count()
    if first < 0 or count < 0 or first + count > distinct:
        raise ValueError(f"first + count: {source} windows 0..{distinct - 1} exist, asked for "
                         f"{first}..{first + count - 1}")
    gen = torch.Generator().manual_seed(seed)
    draws = [float(torch.rand(1, generator=gen)) for _ in range(first + count)]  # window i's depth: the i-th draw
    examples = []
    for i, draw in zip(range(first, first + count), draws[first:], strict=True):
        if source == "later":
            part, article, ids = chunks[i]
            other = next((c for c in chunks[i + 1 :] + chunks[:i] if c[1] != article), None)
            if other is None:
                raise ValueError("the 'later' windows need chunks of at least two articles")
            filler, passage = ids[: len(ids) - passage_len], other[2][-passage_len:]
            title = f"{i}:{wikipedia_articles()[article].title} (part {part})"
        else:
            passage, name = _filler(tokenizer, passage_len, start=11 * i + 5)
            filler, _ = _filler(tokenizer, context - passage_len - len(head), start=11 * i)
            title = f"{i}:{name}"  # the passage's article
        cut = int((0.05 + 0.9 * draw) * len(filler))
        examples.append(TextExample(title, torch.tensor(head + filler[:cut] + passage + filler[cut:] + passage)))
    return examples


def summarise_passkey(trials: list[PasskeyTrial], per_run: dict[tuple[str, float | None], list[dict]]) -> dict:
    """Accuracy with a bootstrap interval per (method, ratio), and paired against the uncompressed model."""
    from .stats import bootstrap_difference, bootstrap_mean

    base = [r["correct"] for r in per_run[("none", None)]]
    summary = []
    for (name, ratio), rows in per_run.items():
        correct = [r["correct"] for r in rows]
        acc, low, high = bootstrap_mean(correct)
        diff, dlow, dhigh = bootstrap_difference(correct, base)
        summary.append({"method": name, "compression_ratio": ratio, "accuracy": acc, "accuracy_ci95": [low, high],
                        "minus_uncompressed": diff, "minus_uncompressed_ci95": [dlow, dhigh],
                        "correct_per_trial": correct})
    return {"trials": [{"title": t.title, "key": t.key, "depth": t.depth, "context": int(t.context.numel())}
                       for t in trials], "summary": summary}
