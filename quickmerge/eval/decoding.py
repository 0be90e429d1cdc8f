"""``quickmerge eval decoding``: a long continuation decoded with the KV cache held to a budget.

Protocol: each example is a window of real Wikipedia text (or, with the AR image / video models, a test image or a
held-out clip window as the model's tokens), a prompt of P tokens prefilled whole and the next C tokens fed one per
call with their positions (teacher forcing: a long generation feeding back its own tokens). Every
full-attention layer is brought back to S entries each time decoding has added I more: QuickMerge++ merges
(``QuickMergePress(0.0, decoding_size=S, decoding_interval=I)``), kvpress evicts (``DecodingPress(scorer,
compression_interval=I, target_size=S)``). Scored: the negative log-likelihood of every continuation token predicted
once the cache was first compressed (before it every method is the uncompressed model), as a per-window mean; all
methods on the same windows, paired bootstrap intervals. With ``--generate`` each method feeds back its own picks
instead (:mod:`quickmerge.eval.generation`, a :class:`DecodingProtocol` as :class:`TeacherForcing` is).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..distributed import Context
from ..text.cache import cache_kwargs, physical_length
from .journal import Journal
from .text import TextExample, _key, _progress, example_numbers, finished_rows, gathered_rows

# kvpress scorer presses its DecodingPress takes (the base must be a ScorerPress), each at its defaults;
# kvpress's LeverageScorePress asserts "only supports prefill". SnapKV also at any window: kvpress-snapkv-wN.
KVPRESS_SCORERS = ("knorm", "streaming-llm", "snapkv", "expected-attention", "expected-attention-eps", "tova",
                   "keydiff", "random")
SCORER_LABELS = {"knorm": "Knorm", "streaming-llm": "StreamingLLM", "snapkv": "SnapKV",
                 "expected-attention": "ExpectedAttention", "expected-attention-eps": "ExpectedAttention, epsilon 0.01",
                 "tova": "TOVA", "keydiff": "KeyDiff", "random": "Random"}
NONE = "none"
OURS = "quickmerge"


@dataclass(frozen=True)
class DecodingBudget:
    """Every full-attention layer back to ``size`` entries each ``interval`` decoded tokens, after a ``prompt``."""

    prompt: int
    size: int
    interval: int

    def refusal(self) -> str | None:
        """Why this budget cannot be compared fairly, or None. kvpress compresses every ``interval`` decoded tokens
        from the prefill on, QuickMergePress when a layer reaches ``size + interval``: the same steps only when the
        prompt is ``size - k * interval`` tokens."""
        if self.size < 1 or self.interval < 1 or not 1 <= self.prompt <= self.size:
            return f"need 1 <= prompt ({self.prompt}) <= size ({self.size}) and interval ({self.interval}) >= 1"
        if (self.size - self.prompt) % self.interval:
            return (f"size - prompt ({self.size} - {self.prompt}) must be a multiple of the interval "
                    f"({self.interval}), so that every method compresses at the same steps")
        return None

    @property
    def first_scored(self) -> int:
        """Index in :func:`continuation_nll`'s output of the first token predicted from a compressed cache: the call
        that first compresses (after its attention) fills the cache to ``size + interval``."""
        return self.size + self.interval - self.prompt + 1


@dataclass(frozen=True)
class DecodingDefaults:
    """What ``quickmerge eval decoding`` runs when the flags are not given, per kind of model."""

    examples: int
    prompt: int
    continuation: int
    sizes: tuple[int, ...]
    interval: int


TEXT_DEFAULTS = DecodingDefaults(examples=32, prompt=128, continuation=640, sizes=(192,), interval=64)


def ar_defaults(fmt: Any) -> DecodingDefaults:
    """Defaults for an AR model of :class:`~quickmerge.ar.formats.SequenceFormat` ``fmt``: the rest of the sequence
    decoded after the prompt. Video: BOS + the first frame prefilled, a quarter frame between compressions, a cache of
    BOS + 1.5 frames (257 / 64 / 385 for 256-token frames). Image: BOS + 4 rows prefilled, one row between
    compressions, a cache of BOS + 7 rows (113 / 28 / 197 for 28 x 28 pixels)."""
    if fmt.context_frames:
        frame = fmt.tokens_per_frame
        prompt, interval, size = 1 + frame, frame // 4, 1 + frame + frame // 2
    else:
        row = fmt.width // fmt.patch
        prompt, interval, size = 1 + 4 * row, row, 1 + 7 * row
    # a window holds P + C + 1 tokens (the last call's prediction is scored too): the whole sequence
    return DecodingDefaults(examples=40, prompt=prompt, continuation=fmt.length - prompt - 1, sizes=(size,),
                            interval=interval)


def is_ours(method: str) -> bool:
    """``quickmerge`` (QuickMergePress at its defaults) or ``quickmerge-w<N>`` (decoding window N)."""
    return method == OURS or method.startswith(f"{OURS}-w")


def method_refusal(method: str, interval: int, sizes: Sequence[int] = ()) -> str | None:
    """Why ``method`` is not a decoding method (or cannot run at this interval and these cache budgets), or None."""
    if method in (NONE, OURS):
        return None
    if is_ours(method):
        window = method.removeprefix(f"{OURS}-w")
        if not window.isdigit() or int(window) < 1:
            return f"{method}: QuickMergePress's decoding window must be a whole number >= 1"
        if sizes and int(window) >= min(sizes):
            return (f"{method}: QuickMergePress's decoding window must be below every size ({min(sizes)}): it keeps "
                    "its entries whole at each merge")
        return None
    scorer = method.removeprefix("kvpress-")
    if not method.startswith("kvpress-"):
        return (f"unknown method {method!r}: quickmerge, quickmerge-w<window>, kvpress-<scorer> or "
                "kvpress-snapkv-w<window>")
    if scorer.startswith("snapkv-w"):
        window = scorer.removeprefix("snapkv-w")
        if not window.isdigit() or not 1 <= int(window) < interval:
            return (f"{method}: SnapKV's window must be a whole number from 1 to interval - 1 ({interval - 1}), the "
                    "hidden states DecodingPress buffers between compressions")
        return None
    if scorer not in KVPRESS_SCORERS:
        return f"unknown kvpress decoding scorer {scorer!r}: one of {', '.join(KVPRESS_SCORERS)} or snapkv-w<window>"
    return None


def default_methods(interval: int, with_kvpress: bool) -> list[str]:
    """QuickMerge++, and kvpress's every scorer at its defaults plus SnapKV at its widest window (its strongest on
    every measured run, BENCHMARKS.md), when kvpress can run."""
    theirs = [f"kvpress-{s}" for s in KVPRESS_SCORERS if s != "expected-attention-eps"]
    theirs.insert(theirs.index("kvpress-snapkv") + 1, f"kvpress-snapkv-w{interval - 1}")
    return [OURS, *(theirs if with_kvpress else [])]


def _kvpress_scorer(scorer: str, interval: int) -> Any:
    import kvpress as kp

    if scorer == "snapkv":  # its observation window must be shorter than the hidden states DecodingPress buffers
        return kp.SnapKVPress(window_size=min(64, interval // 2))
    if scorer.startswith("snapkv-w"):
        return kp.SnapKVPress(window_size=int(scorer.removeprefix("snapkv-w")))
    if scorer == "expected-attention-eps":  # kvpress's evaluation registry's epsilon (without AdaKV: frees nothing)
        return kp.ExpectedAttentionPress(epsilon=1e-2)
    return {"knorm": kp.KnormPress, "streaming-llm": kp.StreamingLLMPress,
            "expected-attention": kp.ExpectedAttentionPress, "tova": kp.TOVAPress, "keydiff": kp.KeyDiffPress,
            "random": kp.RandomPress}[scorer]()


def make_press(method: str, size: int, interval: int) -> Any:
    """The press of ``method`` holding every full-attention layer to ``size`` entries each ``interval`` decoded tokens
    (None for no compression). kvpress's presses get kvpress's own Gemma-3 rule (sliding-window layers left alone, as
    QuickMergePress leaves them)."""
    if method == NONE:
        return None
    if is_ours(method):
        from ..text import QuickMergePress

        window = {} if method == OURS else {"decoding_window": int(method.removeprefix(f"{OURS}-w"))}
        return QuickMergePress(0.0, decoding_size=size, decoding_interval=interval, **window)
    import kvpress as kp

    from .text_methods import global_layers_only, global_rope_default

    scorer = _kvpress_scorer(method.removeprefix("kvpress-"), interval)
    return global_rope_default(global_layers_only(kp.DecodingPress(scorer, compression_interval=interval,
                                                                   target_size=size)))


def method_label(method: str) -> str:
    """``kvpress-snapkv-w63`` -> ``kvpress DecodingPress(SnapKV, window 63)``."""
    if method == OURS:
        return "QuickMerge++ (QuickMergePress, merging)"
    if is_ours(method):
        return f"QuickMerge++ (QuickMergePress, decoding window {method.removeprefix(f'{OURS}-w')})"
    scorer = method.removeprefix("kvpress-")
    if scorer.startswith("snapkv-w"):
        return f"kvpress DecodingPress(SnapKV, window {scorer.removeprefix('snapkv-w')})"
    return f"kvpress DecodingPress({SCORER_LABELS.get(scorer, scorer)})"


def full_attention_layer(model: Any) -> int:
    """The index of the first layer without a sliding window (every layer of Llama; Gemma 3's sixth)."""
    types = getattr(model.config, "layer_types", None) or ["full_attention"]
    return types.index("full_attention")


@torch.no_grad()
def decode(model: Any, prompt_ids: Tensor, calls: int, press: Any, choose: Callable[[int, Tensor], Tensor]) -> float:
    """Prefill ``prompt_ids [B, P]``, then ``calls`` decoding calls of one token each; returns the mean cache length
    (entries per KV head of the first full-attention layer) over the decoding calls.

    ``choose(t, logits [B, V])`` sees each prediction in turn (``t`` = 0 for the prefill's, then one per call) and
    returns ``[B]``, the token the next call is fed: the real text (teacher forcing) or the model's pick
    (generation). Each call gets its token's position (``position_ids``), as kvpress's pipeline passes them: a cache
    kvpress shortened reports its length, not the tokens it has seen."""
    from transformers import DynamicCache

    cache, measured = DynamicCache(), full_attention_layer(model)
    prompt, lengths = prompt_ids.shape[1], []
    with press(model) if press is not None else contextlib.nullcontext():
        logits = model(prompt_ids, **cache_kwargs(model, cache)).logits[:, -1]
        for t in range(calls + 1):
            token = choose(t, logits)
            if t < calls:
                position = torch.full((prompt_ids.shape[0], 1), prompt + t, device=prompt_ids.device)
                logits = model(token[:, None], position_ids=position, **cache_kwargs(model, cache)).logits[:, -1]
                lengths.append(physical_length(cache.layers[measured]))
    return sum(lengths) / len(lengths)


def continuation_nll(model: Any, ids: Tensor, prompt: int, press: Any) -> tuple[Tensor, float]:
    """``[B, N - prompt]`` NLL (nats) of tokens ``prompt .. N - 1`` of ``ids [B, N]``, decoded one per call after a
    prefill of ``prompt`` tokens (teacher forcing), and the mean cache length (:func:`decode`)."""
    nll = []

    def real_text(t: int, logits: Tensor) -> Tensor:
        nll.append(torch.nn.functional.cross_entropy(logits.float(), ids[:, prompt + t], reduction="none"))
        return ids[:, prompt + t]

    cache = decode(model, ids[:, :prompt], ids.shape[1] - prompt - 1, press, real_text)
    return torch.stack(nll, 1), cache


class DecodingProtocol(Protocol):
    """What ``quickmerge eval decoding`` computes per batch of windows, how it summarises the rows and reports them.
    ``journal_name`` goes into the journal's settings (another protocol's rows are refused); ``scores_nll``: the
    summary rows hold ``nll_per_example`` (the AR models' bits per token are added then)."""

    journal_name: str
    scores_nll: bool

    def rows(self, model: Any, ids: Tensor, prompt: int, press: Any, budget: DecodingBudget | None,
             windows: list[str]) -> list[dict[str, Any]]:
        """One journal row per window of ``ids [B, N]`` (``budget`` None: no compression); ``windows`` their names."""
        ...

    def summarise(self, examples: list[TextExample], per_run: dict[tuple[str, int | None], list[dict[str, Any]]],
                  budgets: list[DecodingBudget]) -> dict[str, Any]:
        """The results from every (method, size)'s rows, ``(none, None)`` for no compression."""
        ...

    def describe(self, continuation: int) -> str:
        """What a run does after the prompt, for the plot's title (``640 tokens decoded``)."""
        ...

    def table(self, results: dict[str, Any]) -> str:
        """The results as Markdown."""
        ...

    def plot(self, results: dict[str, Any], path: str, title: str) -> None:
        """The results as a PNG at ``path``."""
        ...


@dataclass(frozen=True)
class TeacherForcing:
    """The real text fed back whatever the model predicted; scored by the NLL of the tokens predicted from a
    compressed cache."""

    def rows(self, model: Any, ids: Tensor, prompt: int, press: Any, budget: DecodingBudget | None,
             windows: list[str]) -> list[dict[str, Any]]:
        """Without compression every token's NLL (each budget scores its own range), else the mean over the tokens
        predicted from a compressed cache."""
        nll, cache = continuation_nll(model, ids, prompt, press)
        if budget is None:
            return [{"nll_tokens": row, "cache": cache} for row in nll.tolist()]
        return [{"nll": value, "cache": cache} for value in nll[:, budget.first_scored :].mean(dim=1).tolist()]

    journal_name = "decoding"
    scores_nll = True

    def summarise(self, examples: list[TextExample], per_run: dict[tuple[str, int | None], list[dict[str, Any]]],
                  budgets: list[DecodingBudget]) -> dict[str, Any]:
        return summarise_decoding(examples, per_run, budgets)

    def describe(self, continuation: int) -> str:
        return f"{continuation} tokens decoded"

    def table(self, results: dict[str, Any]) -> str:
        return format_table(results)

    def plot(self, results: dict[str, Any], path: str, title: str) -> None:
        plot_decoding_eval(results, path, title)


def run_decoding_eval(
    model: Any,
    examples: list[TextExample],
    methods: list[str],
    budgets: list[DecodingBudget],
    *,
    batch: int = 16,
    progress: bool = True,
    journal: Journal | None = None,
    ctx: Context | None = None,
    indices: list[int] | None = None,
    protocol: DecodingProtocol | None = None,
) -> dict[str, Any] | None:
    """Score every (method, budget) on every example, ``batch`` windows per forward pass, and summarise.

    ``protocol``: what each row holds and how rows are summarised, :class:`TeacherForcing` by default
    (:class:`quickmerge.eval.generation.Generation`: free-running generation).

    Rows: one per (window, method, size); no compression once per window, its per-token NLLs kept, so that each
    budget's rows are paired with it on the same tokens. With a ``journal``, each finished batch's rows are on disk at
    once and rows already there are not computed again. Under ``torch.distributed`` (``ctx``), batches (not windows:
    a window's numbers do not depend on how many processes ran) are shared out by rank and the rows gathered on rank
    0, which returns the summary (the others return None). ``indices``: the windows' numbers (default 0..n-1).
    """
    ctx = ctx or Context()
    protocol = protocol or TeacherForcing()
    number = example_numbers(indices, len(examples))
    done = finished_rows(journal, ctx)
    runs: list[tuple[str, DecodingBudget | None]] = [(NONE, None)]
    runs += [(m, b) for b in budgets for m in methods if m != NONE]
    starts = range(0, len(examples), batch)
    items = [(run, start) for run in runs for start in starts]

    def keys(run: tuple[str, DecodingBudget | None], start: int) -> list[str]:
        size = None if run[1] is None else run[1].size
        return [_key(number[i], examples[i], run[0], size) for i in range(start, min(start + batch, len(examples)))]

    todo = [item for item in items if any(k not in done for k in keys(*item))]
    total = len(runs) * len(examples)
    bar = _progress(total, progress and ctx.main, initial=total - sum(len(keys(*item)) for item in todo))
    prompt = budgets[0].prompt
    new: dict[str, dict[str, Any]] = {}
    for (method, budget), start in todo[ctx.rank :: ctx.world]:
        names = keys((method, budget), start)
        bar.set_postfix_str(method if budget is None else f"{method} at {budget.size}")
        torch.manual_seed(zlib.crc32(names[0].encode()))  # kvpress's RandomPress: the same rows however run
        ids = torch.stack([e.ids for e in examples[start : start + len(names)]]).to(next(model.parameters()).device)
        press = None if budget is None else make_press(method, budget.size, budget.interval)
        windows = [_key(number[i], examples[i], "", None) for i in range(start, start + len(names))]
        rows = protocol.rows(model, ids, prompt, press, budget, windows)
        for key, row in zip(names, rows, strict=True):
            if key in done:  # a window of a batch that was journaled in part (a smaller --examples): kept as it was
                continue
            new[key] = row
            if journal is not None:
                journal.add(key, row)
        bar.update(len(names) * ctx.world)
    bar.close()
    done = gathered_rows(done, new, ctx)
    if done is None:
        return None
    per_run = {}
    for method, budget in runs:
        size = None if budget is None else budget.size
        per_run[(method, size)] = [done[_key(number[i], e, method, size)] for i, e in enumerate(examples)]
    return protocol.summarise(examples, per_run, budgets)


def summarise_decoding(
    examples: list[TextExample], per_run: dict[tuple[str, int | None], list[dict[str, Any]]],
    budgets: list[DecodingBudget],
) -> dict[str, Any]:
    """Per (method, size): perplexity, paired ratio to no compression on the same tokens (95% bootstrap intervals),
    mean cache entries and the share of no compression's they save (a ``none`` row per size: the uncompressed model
    on that size's scored tokens, ``decoding_interval`` None); QuickMerge++ paired against every kvpress press
    at each size, and against the best (lowest perplexity, chosen after the fact, which favours kvpress):
    ``paired_by_method`` for each QuickMerge++ configuration run, ``paired`` for its defaults (or, when only
    ``quickmerge-w<N>`` ran, the first of those; each block names it, ``ours``)."""
    from .stats import bootstrap_ppl, bootstrap_ratio

    tokens = [torch.tensor(r["nll_tokens"]) for r in per_run[(NONE, None)]]
    full_cache = sum(r["cache"] for r in per_run[(NONE, None)]) / len(examples)
    summary, by_method = [], {}
    for budget in budgets:
        base = [float(t[budget.first_scored :].mean()) for t in tokens]
        at = {NONE: base, **{m: [r["nll"] for r in rows] for (m, s), rows in per_run.items() if s == budget.size}}
        for method, nll in at.items():
            ppl, low, high = bootstrap_ppl(nll)
            rel, rel_low, rel_high = bootstrap_ratio(nll, base)
            rows = per_run[(method, None if method == NONE else budget.size)]
            cache = sum(r["cache"] for r in rows) / len(rows)
            summary.append({"method": method, "decoding_size": budget.size,
                            "decoding_interval": None if method == NONE else budget.interval,
                            "scored_from_token": budget.first_scored, "perplexity": ppl, "perplexity_ci95": [low, high],
                            "ratio_to_uncompressed": rel, "ratio_to_uncompressed_ci95": [rel_low, rel_high],
                            "mean_cache_entries": cache, "memory_saved": 1 - cache / full_cache,
                            "nll_per_example": nll})
        theirs = {m: v for m, v in at.items() if m.startswith("kvpress-")}
        for method in (m for m in at if is_ours(m) and theirs):
            ours = at[method]

            def against(nll: list[float], ours: list[float] = ours) -> dict[str, Any]:
                return {"ratio": list(bootstrap_ratio(ours, nll)),
                        "lower_on": sum(a < b for a, b in zip(ours, nll, strict=True))}

            best = min(theirs, key=lambda m: sum(theirs[m]))  # lowest mean NLL: lowest perplexity
            each = {m: against(v) for m, v in theirs.items()}
            by_method.setdefault(method, {})[str(budget.size)] = {
                "ours": method, "best_kvpress": best, "quickmerge_vs_best": each[best]["ratio"],
                "lower_on": each[best]["lower_on"], "windows": len(ours), "quickmerge_vs_each": each}
    # ``paired``: QuickMergePress at its defaults when it ran, else the first variant; every one in by_method
    paired = by_method.get(OURS, next(iter(by_method.values()), {}))
    return {"examples": [e.title for e in examples], "summary": summary, "paired": paired,
            "paired_by_method": by_method}


def format_table(results: dict[str, Any]) -> str:
    """Markdown table per size: perplexity and paired ratio to no compression with 95% intervals, cache entries."""
    lines = ["| size | method | perplexity [95% CI] | vs uncompressed [95% CI] | cache entries | memory saved |",
             "|---|---|---|---|---|---|"]
    for r in sorted(results["summary"], key=lambda r: (r["decoding_size"], r["decoding_interval"] is not None,
                                                      r["ratio_to_uncompressed"])):
        lo, hi = r["perplexity_ci95"]
        rlo, rhi = r["ratio_to_uncompressed_ci95"]
        lines.append(f"| {r['decoding_size']} | {r['method']} | {r['perplexity']:.3f} [{lo:.2f}, {hi:.2f}] | "
                     f"{r['ratio_to_uncompressed']:.4f} [{rlo:.4f}, {rhi:.4f}] | {r['mean_cache_entries']:.0f} | "
                     f"{r['memory_saved']:.0%} |")
    lines.append("")
    for method, paired in results.get("paired_by_method", {OURS: results["paired"]}).items():
        for size, p in paired.items():
            value, low, high = p["quickmerge_vs_best"]
            lines.append(f"size {size}: {method} / {p['best_kvpress']} (paired perplexity ratio) {value:.4f} "
                         f"[{low:.4f}, {high:.4f}], lower on {p['lower_on']}/{p['windows']} windows")
    return "\n".join(lines)


def plot_decoding_eval(results: dict[str, Any], path: str, title: str,
                       label: Callable[[str], str] = method_label) -> None:
    """One size: each method's paired perplexity ratio to no compression with its 95% interval, best at the top,
    QuickMerge++ in red. Several sizes: that ratio against the cache entries held (one line per method), and
    QuickMerge++'s paired ratio to the best kvpress press at each size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compressed = [r for r in results["summary"] if r["method"] != NONE]
    sizes = sorted({r["decoding_size"] for r in compressed})
    if len(sizes) > 1:
        _plot_budget_curve(results, compressed, sizes, title, label)
    else:
        rows = sorted(compressed, key=lambda r: -r["ratio_to_uncompressed"])
        _, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.8))
        interval_dots(ax, rows, "ratio_to_uncompressed", "{:.3f}", label)
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        saved = sum(r["memory_saved"] for r in rows) / len(rows)
        ax.set_xlabel("continuation perplexity / uncompressed (paired, 95% interval)")
        ax.set_title(f"{title}\nback to {sizes[0]} entries every {rows[0]['decoding_interval']} tokens "
                     f"({saved:.0%} of the cache saved on average)", fontsize=9)
    plt.gcf().tight_layout()
    plt.gcf().savefig(path, dpi=120)
    plt.close(plt.gcf())


def interval_dots(ax: Any, rows: list[dict[str, Any]], key: str, shown: str, label: Callable[[str], str]) -> None:
    """One row of ``ax`` per method, bottom up: ``row[key]`` with its ``row[key + '_ci95']`` interval, written
    with the format ``shown``, QuickMerge++ in red and kvpress in blue; the methods' labels on the y axis."""
    for i, r in enumerate(rows):
        value, (low, high) = r[key], r[f"{key}_ci95"]
        colour = "tab:red" if is_ours(r["method"]) else "tab:blue"
        ax.errorbar(value, i, xerr=[[value - low], [high - value]], fmt="o", color=colour, capsize=3)
        ax.annotate(shown.format(value), (high, i), xytext=(6, 0), textcoords="offset points", va="center",
                    fontsize=8)
    ax.set_yticks(range(len(rows)), [label(r["method"]) for r in rows], fontsize=8)


def _plot_budget_curve(results: dict[str, Any], compressed: list[dict[str, Any]], sizes: list[int], title: str,
                       label: Callable[[str], str]) -> None:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (curve, paired) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    for method in dict.fromkeys(r["method"] for r in compressed):
        mine = sorted((r for r in compressed if r["method"] == method), key=lambda r: r["mean_cache_entries"])
        x = [r["mean_cache_entries"] for r in mine]
        y = [r["ratio_to_uncompressed"] for r in mine]
        err = [[v - r["ratio_to_uncompressed_ci95"][0] for v, r in zip(y, mine, strict=True)],
               [r["ratio_to_uncompressed_ci95"][1] - v for v, r in zip(y, mine, strict=True)]]
        style = {"color": "black", "linewidth": 2.5, "zorder": 3} if method == OURS else {"linewidth": 1.2}
        curve.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label(method), **style)
        if method == OURS:
            for r, xi, yi in zip(mine, x, y, strict=True):
                curve.annotate(f"S = {r['decoding_size']}", (xi, yi), xytext=(6, 6), textcoords="offset points",
                               fontsize=8)
    if max(r["ratio_to_uncompressed"] for r in compressed) > 1.5:  # a log scale pays only over a wide range
        curve.set_yscale("log")
        curve.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        curve.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2f"))
    curve.set_xlabel("mean cache entries per KV head over the continuation (S to S + I once compressed)")
    curve.set_ylabel("continuation perplexity / uncompressed (paired, 95% interval)")
    curve.grid(alpha=0.3)
    curve.legend(fontsize=8)
    curve.set_title("every method at each budget S", fontsize=9)
    shown = [s for s in sizes if str(s) in results.get("paired", {})]
    for i, size in enumerate(shown):
        p = results["paired"][str(size)]
        value, low, high = p["quickmerge_vs_best"]
        paired.errorbar(value, i, xerr=[[value - low], [high - value]], fmt="o", color="black", capsize=3)
        paired.annotate(f"{value:.4f} [{low:.4f}, {high:.4f}], lower on {p['lower_on']}/{p['windows']} windows",
                        (value, i), xytext=(0, 9), textcoords="offset points", ha="center", fontsize=8)
    paired.set_yticks(range(len(shown)), [f"S = {s}, vs\n{label(results['paired'][str(s)]['best_kvpress'])}"
                                          .replace("kvpress ", "") for s in shown], fontsize=8)
    paired.set_ylim(-0.6, len(shown) - 0.4)
    paired.axvline(1.0, color="grey", lw=0.8, ls="--")
    ours = next(iter(results.get("paired", {}).values()), {}).get("ours", OURS)
    paired.set_xlabel(f"{label(ours)}\n/ best kvpress press at that S (paired perplexity ratio, 95% interval)")
    paired.set_title("below 1: merging beats kvpress's best eviction", fontsize=9)
    fig.suptitle(title, fontsize=10)
