"""``quickmerge eval text``: continuation perplexity of a real causal LM on a compressed context.

Protocol (NOTES.md): each example is a window of real Wikipedia text, a context of C
tokens and the next T tokens of the same article. The context is prefilled under a
compression method at ratio r (share of entries removed), then the T continuation tokens
are scored by teacher forcing, their positions continuing from C. All methods see the
same examples in one run; perplexity intervals are bootstrap 95% over examples.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data import wikipedia_articles
from ..distributed import Context
from ..text.attention import decoder_attention_as
from ..text.cache import cache_kwargs, physical_length
from ..text.decoder import base_model, keeps_fixed_state, stacked_layers
from .journal import Journal
from .timing import clock


@dataclass
class TextExample:
    """One scored window: ``ids`` holds C + T + 1 tokens (the +1 is the last target)."""

    title: str
    ids: Tensor


def wikipedia_windows(
    tokenizer: Any, count: int, context: int = 1024, continuation: int = 64, *, bos: bool = False
) -> list[TextExample]:
    """``count`` windows of C + T + 1 tokens: the opening window of every article long enough to
    hold one, in dump order; then, when more are asked for, each article's second window (the next
    C + T + 1 tokens, no overlap), then its third, and so on. The first windows never change with
    ``count``. ``bos``: each window starts with the BOS token (counted in C)."""
    need = context + continuation + 1
    body = need - 1 if bos else need  # article tokens per window
    examples: list[TextExample] = []
    tokenized: list[tuple[str, list[int]]] = []

    def take(title: str, ids: list[int], part: int) -> bool:
        piece = ids[part * body : (part + 1) * body]
        piece = [tokenizer.bos_token_id, *piece] if bos else piece
        examples.append(TextExample(title if part == 0 else f"{title} (window {part + 1})", torch.tensor(piece)))
        return len(examples) == count

    for article in wikipedia_articles():  # the openings, tokenizing only as far as needed
        ids = tokenizer(article.text, add_special_tokens=False)["input_ids"]
        tokenized.append((article.title, ids))
        if len(ids) >= body and take(article.title, ids, 0):
            return examples
    part = 1
    while any(len(ids) >= (part + 1) * body for _, ids in tokenized):
        for title, ids in tokenized:
            if len(ids) >= (part + 1) * body and take(title, ids, part):
                return examples
        part += 1
    raise ValueError(
        f"the Wikipedia articles hold only {len(examples)} windows of {need} tokens (context {context} + "
        f"continuation {continuation} + 1); ask for fewer examples or shorter windows"
    )


@dataclass
class Method:
    """A compression method: ``make(ratio)`` returns a context-manager factory ``f(model)``.

    ``decode_inside``: keep the method active while the continuation is scored (needed by
    presses that act at decode time); kvpress presses act at prefill only.
    ``eager``: the method needs eager attention (it reads attention weights).
    ``masks``: the method hides entries inside attention instead of removing them (kvpress's
    AdaKV family): the cache keeps its length, so it saves no memory.
    """

    name: str
    make: Callable[[float], Callable[[Any], contextlib.AbstractContextManager]]
    decode_inside: bool = False
    eager: bool = False
    masks: bool = False


@contextlib.contextmanager
def _masks_for_shortened_layers(model: Any, cache: Any) -> Iterator[None]:
    """Give layers whose cache a press shortened more than others a mask of their own length.

    transformers builds one mask per layer type from the cache's lengths; when a press
    compressed only some layers of a type-mixed model (kvpress on Gemma 3's global layers),
    the shortened layers need "every cached entry visible, new tokens causal" at their own
    length. Models whose layers all have the same length are left untouched.
    """
    from ..text.decoder import cache_causal_mask, decoder_attention_layers

    lengths = [physical_length(layer) for layer in cache.layers if physical_length(layer)]  # not a hybrid's states
    if len(set(lengths)) <= 1:
        yield
        return

    def before(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        past = cache.layers[module.layer_idx].keys.shape[2]
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if past >= max(lengths):
            return None
        kwargs["attention_mask"] = cache_causal_mask(past, hidden.shape[1], hidden.device, hidden.dtype)
        return args, kwargs

    handles = [a.register_forward_pre_hook(before, with_kwargs=True) for a in decoder_attention_layers(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class Prefilled:
    """The cache a method left after the prefill and how long the prefill took (seconds).

    ``prefill_s`` runs from the prompt to the compressed cache: for a press that acts at prefill
    only, its exit (where kvpress's KVzip does its scoring pass) is inside it.
    """

    cache: Any
    prefill_s: float


@contextlib.contextmanager
def prefilled(model: Any, ids: Tensor, press: Any, method: Method) -> Iterator[Prefilled]:
    """Prefill ``ids [1, C]`` under ``press``; decode inside the ``with`` block as ``method`` needs.

    The one sequence every protocol shares: eager attention if the method reads attention
    weights; the press active during the prefill, and during decoding only for
    ``decode_inside`` methods (ours act at decode time, kvpress's presses at prefill only);
    otherwise decoding runs after the press is removed, with per-layer masks where the press
    shortened some layers more than others.
    """
    from transformers import DynamicCache

    # a hybrid model's cache holds its other layers' fixed-size states too, laid out from its config (the layers
    # read as they are: kvpress's presses and no compression run on models the presses here refuse)
    hybrid = any(keeps_fixed_state(layer) for layer in stacked_layers(base_model(model)))
    cache = DynamicCache(config=model.config) if hybrid else DynamicCache()
    with contextlib.ExitStack() as decoding:
        if method.eager:
            decoding.enter_context(decoder_attention_as(model, "eager"))
        with contextlib.ExitStack() as pressing:
            if press is not None:
                pressing.enter_context(press(model))
            start = clock(ids.device)
            model.model(input_ids=ids, **cache_kwargs(model.model, cache))
            if not method.decode_inside:
                pressing.close()  # a press may compress on exit (kvpress's KVzip reads the prompt again here)
            state = Prefilled(cache, clock(ids.device) - start)
            if not method.decode_inside:
                decoding.enter_context(_masks_for_shortened_layers(model, cache))
            yield state


@torch.no_grad()
def score_example(
    model: Any, example: TextExample, context: int, press: Any, method: Method, ratio: float | None = None
) -> dict[str, float]:
    """NLL per continuation token, wall times and the achieved ratio for one example."""
    ids = example.ids[None].to(next(model.parameters()).device)
    ctx, cont, target = ids[:, :context], ids[:, context:-1], ids[:, context + 1 :]
    positions = torch.arange(context, context + cont.shape[1], device=ids.device)[None]
    with prefilled(model, ctx, press, method) as state:
        cache = state.cache
        # mean entries per KV head over the layers of global attention (Gemma: not the sliding ones, bounded by
        # their window; a hybrid model: not the layers of a fixed-size state); flat layers hold every head in one
        # row, a latent cache (DeepSeek's, transformers 5.2x) one row for all heads
        text_config = model.config.get_text_config()  # a vision-language model's decoder settings
        types = getattr(text_config, "layer_types", None) or ["full_attention"] * len(cache.layers)
        cached = [(layer, kind) for layer, kind in zip(cache.layers, types, strict=False) if physical_length(layer)]
        full = [layer for layer, kind in cached if "sliding" not in kind and "chunked" not in kind]
        full = full or [layer for layer, _ in cached]
        kept = sum(physical_length(layer) / (getattr(layer, "folded_heads", 0) or 1) for layer in full) / len(full)
        start = clock(ids.device)
        if method.masks:  # as kvpress's pipeline decodes: its fake keys need one query per call
            logits = torch.cat([model(input_ids=cont[:, t : t + 1], **cache_kwargs(model, cache),
                                      position_ids=positions[:, t : t + 1]).logits
                                for t in range(cont.shape[1])], dim=1)
        else:
            logits = model(input_ids=cont, **cache_kwargs(model, cache), position_ids=positions).logits
        decode = clock(ids.device) - start
    nll = F.cross_entropy(logits[0].float(), target[0]).item()
    memory_saved = 1 - kept / context  # of the compressed layers' entries
    achieved = getattr(press, "achieved_ratio", None)  # presses that know it (ours)
    if achieved is None:
        achieved = ratio if method.masks else memory_saved
    return {"nll": nll, "prefill_s": state.prefill_s, "decode_s": decode, "achieved_ratio": achieved,
            "memory_saved": memory_saved}


@torch.no_grad()
def generate_continuation(
    model: Any, example: TextExample, context: int, steps: int, press: Any, method: Method,
    *, sample: bool = False, generator: torch.Generator | None = None,
) -> Tensor:
    """``steps`` tokens ``[steps]`` generated after the context compressed by ``press``.

    The layout of :func:`score_example`: the first ``context`` ids are prefilled under the
    press, the next id is given, then each generated token is fed back one at a time
    (greedy, or sampled from the softmax with ``sample``).
    """
    device = next(model.parameters()).device
    ids = example.ids[None].to(device)
    out: list[int] = []
    with prefilled(model, ids[:, :context], press, method) as state:
        token = ids[:, context : context + 1]
        for t in range(steps):
            position = torch.tensor([[context + t]], device=device)
            step = model(input_ids=token, **cache_kwargs(model, state.cache), position_ids=position)
            logits = step.logits[0, -1].float()
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator) if sample else logits.argmax(-1, True)
            out.append(int(nxt))
            token = nxt.view(1, 1)
    return torch.tensor(out)


NO_COMPRESSION = Method("none", lambda r: None)


def _key(index: int, example: Any, method: str, ratio: float | None) -> str:
    return f"{index}|{example.title}|{method}|{ratio}"


def finished_rows(journal: Journal | None, ctx: Context) -> dict[str, Any]:
    """The rows already in ``journal`` (rank 0 reads them, every rank gets them); each rank opens its own file."""
    done = ctx.broadcast(journal.open() if journal is not None and ctx.main else {})
    if journal is not None and not ctx.main:
        journal.open()
    return done


def example_numbers(indices: list[int] | None, count: int) -> list[int]:
    """The examples' numbers in the journal: ``indices``, or 0 .. count - 1."""
    number = list(range(count)) if indices is None else list(indices)
    if len(number) != count:
        raise ValueError(f"indices: expected one per example ({count}), got {len(number)}")
    return number


def gathered_rows(done: dict[str, Any], new: dict[str, Any], ctx: Context) -> dict[str, Any] | None:
    """On rank 0: the journal's rows and every rank's ``new`` ones; None on the other ranks."""
    gathered = ctx.gather(new)
    if gathered is None:
        return None
    for part in gathered:
        done.update(part)
    return done


def run_text_eval(
    model: Any,
    examples: list[Any],
    methods: list[Method],
    ratios: list[float],
    context: int,
    *,
    progress: bool = True,
    journal: Journal | None = None,
    ctx: Context | None = None,
    scorer: Callable[[Any, Any, Method, float | None], dict[str, Any]] | None = None,
    summary: Callable[[list[Any], dict[tuple[str, float | None], list[dict[str, Any]]]], dict] | None = None,
    indices: list[int] | None = None,
) -> dict[str, Any] | None:
    """Score every (example, method, ratio) and summarise; examples are the outer loop.

    ``scorer(example, press, method, ratio) -> row`` and ``summary(examples, rows per run)``
    replace :func:`score_example` and :func:`summarise` for other tasks (retrieval). ``indices``:
    the examples' numbers in the journal, when they are a subset of a larger run's (default 0..n-1).

    With a ``journal``, each finished row is on disk at once and rows already there are not
    computed again. Under ``torch.distributed`` (``ctx``), examples are shared out by rank and
    the rows gathered on rank 0, which returns the summary (the other ranks return None).
    Each row runs with torch's global generator seeded from its key, so presses that draw random numbers
    (kvpress's LeverageScore and Compactor sketches) give the same row whatever ran before it: alone, resumed,
    or on any number of processes.
    """
    ctx = ctx or Context()
    runs: list[tuple[Method, float | None]] = [(NO_COMPRESSION, None)]
    runs += [(m, r) for r in ratios for m in methods]
    done = finished_rows(journal, ctx)
    number = example_numbers(indices, len(examples))
    items = [(i, run) for i in range(len(examples)) for run in runs]
    todo = [(i, run) for i, run in items if _key(number[i], examples[i], run[0].name, run[1]) not in done]
    mine = [item for item in todo if item[0] % ctx.world == ctx.rank]
    bar = _progress(len(items), progress and ctx.main, initial=len(items) - len(todo))
    new: dict[str, dict[str, float]] = {}
    for i, (method, ratio) in mine:
        key = _key(number[i], examples[i], method.name, ratio)
        torch.manual_seed(zlib.crc32(key.encode()))
        press = None if ratio is None else method.make(ratio)
        if scorer is None:
            row = score_example(model, examples[i], context, press, method, ratio)
        else:
            row = scorer(examples[i], press, method, ratio)
        new[key] = row
        if journal is not None:
            journal.add(key, row)
        bar.update(ctx.world)
    bar.close()
    done = gathered_rows(done, new, ctx)
    if done is None:
        return None
    per_run = {(m.name, r): [done[_key(number[i], e, m.name, r)] for i, e in enumerate(examples)] for m, r in runs}
    return (summary or summarise)(examples, per_run)


def summarise(examples: list[TextExample], per_run: dict[tuple[str, float | None], list[dict[str, float]]]) -> dict:
    """Perplexities, paired ratios to no compression with bootstrap intervals, medians of the timings."""
    from .stats import bootstrap_ppl, bootstrap_ratio

    base = [r["nll"] for r in per_run[("none", None)]]
    summary = []
    for (name, ratio), rows in per_run.items():
        nll = [r["nll"] for r in rows]
        ppl, low, high = bootstrap_ppl(nll)
        rel, rel_low, rel_high = bootstrap_ratio(nll, base)
        summary.append(
            {
                "method": name,
                "compression_ratio": ratio,
                "perplexity": ppl,
                "perplexity_ci95": [low, high],
                "ratio_to_uncompressed": rel,
                "ratio_to_uncompressed_ci95": [rel_low, rel_high],
                "achieved_ratio": sum(r["achieved_ratio"] for r in rows) / len(rows),
                "memory_saved": sum(r.get("memory_saved", r["achieved_ratio"]) for r in rows) / len(rows),
                "prefill_s_median": _median([r["prefill_s"] for r in rows]),
                "decode_s_median": _median([r["decode_s"] for r in rows]),
                "nll_per_example": nll,
            }
        )
    return {"examples": [e.title for e in examples], "summary": summary}


def _median(values: list[float]) -> float:
    return float(torch.tensor(values).median())


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, initial: int = 0) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc="scoring", unit="run")


def highlighted_methods(rows: list[dict[str, Any]]) -> list[str]:
    """The methods a plot names: our default press, our best and kvpress's best at each ratio, random.

    ``rows``: summary rows with a ratio. Ours are the methods not prefixed ``kvpress-``
    (``random`` and ``tome-kv`` are baselines, not ours). kvpress's best is named twice where
    the best of all masks entries instead of freeing them: the best that shrinks the cache too.
    """
    ratios = sorted({r["compression_ratio"] for r in rows})
    ours = [r for r in rows if not r["method"].startswith("kvpress-") and r["method"] not in ("random", "tome-kv")]
    theirs = [r for r in rows if r["method"].startswith("kvpress-")]
    shrinking = [r for r in theirs if r.get("memory_saved", r["compression_ratio"]) >= r["compression_ratio"] - 0.01]
    names = ["quickmerge"] if any(r["method"] == "quickmerge" for r in rows) else []
    for group in (ours, theirs, shrinking):
        for ratio in ratios:
            at = [r for r in group if r["compression_ratio"] == ratio]
            if at:
                names.append(min(at, key=lambda r: r["ratio_to_uncompressed"])["method"])
    if any(r["method"] == "random" for r in rows):
        names.append("random")
    return list(dict.fromkeys(names))


def plot_text_eval(results: dict[str, Any], path: str, title: str) -> None:
    """Perplexity relative to no compression vs compression ratio, 95% CIs.

    Left: every method (log scale over a wide range); the ones :func:`highlighted_methods` picks in colour and
    named, the rest in grey. Right: the highlighted ones alone, on a linear scale.
    """
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["summary"] if r["compression_ratio"] is not None]
    names = list(dict.fromkeys(r["method"] for r in rows))
    named = highlighted_methods(rows)
    warm = iter(plt.get_cmap("autumn")([0.0, 0.35, 0.6, 0.8]))
    cool = iter(plt.get_cmap("winter")([0.0, 0.4, 0.8, 1.0]))
    style = {}
    for name in named:
        if name == "quickmerge":
            style[name] = {"color": "black", "linewidth": 2.5, "zorder": 4}
        elif name == "random":
            style[name] = {"color": "grey", "linewidth": 1.5, "linestyle": "--", "zorder": 3}
        else:
            palette = cool if name.startswith("kvpress-") else warm
            style[name] = {"color": next(palette, "purple"), "linewidth": 2, "zorder": 3}
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for zoomed, ax in zip((False, True), axes, strict=True):
        others = 0
        for name in names:
            if zoomed and name not in style:
                continue
            mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["compression_ratio"])
            x = [r["compression_ratio"] for r in mine]
            y = [r["ratio_to_uncompressed"] for r in mine]
            if name not in style:
                label = f"other methods ({len(names) - len(named)})" if others == 0 else None
                ax.plot(x, y, color="0.8", linewidth=0.8, marker=".", zorder=1, label=label)
                others += 1
                continue
            err = [[v - r["ratio_to_uncompressed_ci95"][0] for v, r in zip(y, mine, strict=True)],
                   [r["ratio_to_uncompressed_ci95"][1] - v for v, r in zip(y, mine, strict=True)]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name, **style[name])
        ax.set_xlabel("compression ratio (share of context KV entries removed)")
        ax.grid(alpha=0.3)
        if zoomed:
            ax.set_title("named methods: ours, best of ours and of kvpress at each ratio")
            ax.legend(fontsize=8, loc="upper left")
        else:
            if max(r["ratio_to_uncompressed"] for r in rows) > 1.5:  # a log scale pays only over a wide range
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
                ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.1f"))
            ax.set_ylabel("continuation perplexity / uncompressed")
            ax.set_title(title)
            if others:
                ax.legend(handles=[h for h, n in zip(*ax.get_legend_handles_labels(), strict=True)
                                   if n.startswith("other methods")], fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
