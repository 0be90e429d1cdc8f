"""``quickmerge eval decoding --generate``: free-running generation with the KV cache held to a budget.

Teacher forcing feeds the real text back whatever the compressed model predicted; a user's model feeds back its own
tokens, and one changed token changes everything after it. Here every method (no compression included) prefills the
same prompt and then picks each next token itself, its cache compressed exactly as in the teacher-forced protocol
(:mod:`quickmerge.eval.decoding`: same sizes, intervals and presses, equal memory).

Picking is greedy (``temperature`` 0) or *coupled* sampling: token t of a window is ``argmax(logits / T + g)`` with
Gumbel noise ``g`` that depends only on (window, t, vocabulary index), a counter-based hash, so every method draws
the same noise (Gumbel-max: each token is still a sample of softmax(logits / T)). Uncompressed generation is then the
one continuation a faithful cache reproduces. Score per window: the tokens identical to it after the first compression
(the common prefix, counted from the first token predicted from a compressed cache).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .decoding import NONE, DecodingBudget, decode, interval_dots, is_ours, method_label

_MASK32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A bijection of ``[0, 2^32)`` (int64 tensors) that scatters nearby inputs (xor-shift / multiply rounds)."""
    for _ in range(2):
        x = x ^ (x >> 16)
        x = (x * 0x45D9F3B) & _MASK32  # < 2^59: no int64 overflow
    return x ^ (x >> 16)


def window_seeds(names: list[str]) -> Tensor:
    """``[B]`` int64 seeds, one per window name (its number and title): the same whatever batch it is decoded in."""
    return torch.tensor([zlib.crc32(name.encode()) for name in names], dtype=torch.int64)


def coupled_gumbel(seeds: Tensor, step: int, vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """``[B, vocab]`` float32 standard Gumbel noise for prediction ``step`` of the windows of ``seeds [B]``: a
    function of (seed, step, vocabulary index) alone, the same on every device, batch and process."""
    key = _mix32((_mix32(seeds.to(device)) + step * 0x9E3779B1) & _MASK32)[:, None]  # [B, 1]
    index = torch.arange(vocab, device=device, dtype=torch.int64)[None]  # [1, V]
    bits = _mix32(_mix32((key + index * 0x85EBCA6B) & _MASK32) ^ key)
    uniform = (bits.double() + 0.5) / 2.0**32  # in (0, 1)
    return (-torch.log(-torch.log(uniform))).float()


def pick_tokens(logits: Tensor, temperature: float, seeds: Tensor, step: int) -> Tensor:
    """``[B]`` tokens from ``logits [B, V]``: the argmax at temperature 0, else the coupled Gumbel-max sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    noise = coupled_gumbel(seeds, step, logits.shape[-1], logits.device)
    return (logits.float() / temperature + noise).argmax(dim=-1)


def generated_tokens(model: Any, prompt_ids: Tensor, calls: int, press: Any, temperature: float,
                     seeds: Tensor) -> tuple[Tensor, float]:
    """``[B, calls + 1]`` tokens the model picks after ``prompt_ids [B, P]`` (the prefill's pick, then one per call,
    each call fed the previous pick) under ``press``, and the mean cache length (:func:`~.decoding.decode`)."""
    picked: list[Tensor] = []

    def own_pick(t: int, logits: Tensor) -> Tensor:
        picked.append(pick_tokens(logits, temperature, seeds, t))
        return picked[-1]

    cache = decode(model, prompt_ids, calls, press, own_pick)
    return torch.stack(picked, 1), cache


def common_prefix(tokens: Tensor, reference: Tensor) -> Tensor:
    """``[B]`` number of leading positions where ``tokens [B, N]`` equals ``reference [B, N]``."""
    same = (tokens == reference).long()
    return same.cumprod(dim=1).sum(dim=1)


@dataclass(frozen=True)
class Generation:
    """``eval decoding``'s protocol (:class:`~.decoding.DecodingProtocol`) for free-running generation at
    ``temperature`` (0: greedy): each row the tokens picked."""

    temperature: float = 0.0
    scores_nll = False

    @property
    def journal_name(self) -> str:
        return f"generation at temperature {self.temperature!r}"

    def rows(self, model: Any, ids: Tensor, prompt: int, press: Any, budget: DecodingBudget | None,
             windows: list[str]) -> list[dict[str, Any]]:
        tokens, cache = generated_tokens(model, ids[:, :prompt], ids.shape[1] - prompt - 1, press, self.temperature,
                                         window_seeds(windows))
        return [{"tokens": row, "cache": cache} for row in tokens.tolist()]

    def summarise(self, examples: list[Any], per_run: dict[tuple[str, int | None], list[dict[str, Any]]],
                  budgets: list[DecodingBudget]) -> dict[str, Any]:
        return summarise_generation(examples, per_run, budgets, self.temperature)

    def describe(self, continuation: int) -> str:
        picking = "greedy" if self.temperature == 0 else f"sampled at temperature {self.temperature:g}, coupled"
        return f"{continuation + 1} tokens generated ({picking})"

    def table(self, results: dict[str, Any]) -> str:
        return format_generation_table(results)

    def plot(self, results: dict[str, Any], path: str, title: str) -> None:
        plot_generation_eval(results, path, title)


def summarise_generation(
    examples: list[Any], per_run: dict[tuple[str, int | None], list[dict[str, Any]]],
    budgets: list[DecodingBudget], temperature: float,
) -> dict[str, Any]:
    """Per (method, size): mean tokens identical to no compression's continuation after the first compression (95%
    bootstrap interval), the share of windows identical to the end, windows that differed before any compression
    (a numerical difference, not the budget: reported, expected 0), mean cache entries and the share saved. Each
    QuickMerge++ configuration paired against every kvpress press (difference of means, 95% bootstrap interval) and
    the best one (most tokens kept, chosen after the fact, which favours kvpress)."""
    from .stats import bootstrap_difference, bootstrap_mean

    reference = torch.tensor([r["tokens"] for r in per_run[(NONE, None)]])
    full_cache = sum(r["cache"] for r in per_run[(NONE, None)]) / len(examples)
    length = reference.shape[1]
    summary, by_method = [], {}
    for budget in budgets:
        first = budget.first_scored
        rows_at = {NONE: per_run[(NONE, None)],
                   **{m: rows for (m, s), rows in per_run.items() if s == budget.size}}
        kept: dict[str, list[float]] = {}
        for method, rows in rows_at.items():
            prefix = common_prefix(torch.tensor([r["tokens"] for r in rows]), reference)
            kept[method] = (prefix - first).clamp(min=0).double().tolist()
            mean, low, high = bootstrap_mean(kept[method])
            cache = sum(r["cache"] for r in rows) / len(rows)
            summary.append({"method": method, "decoding_size": budget.size,
                            "decoding_interval": None if method == NONE else budget.interval,
                            "temperature": temperature, "scored_from_token": first, "tokens_scored": length - first,
                            "identical_tokens": mean, "identical_tokens_ci95": [low, high],
                            "identical_share": mean / (length - first),
                            "identical_to_the_end": float((prefix == length).double().mean()),
                            "different_before_compression": int((prefix < first).sum()),
                            "mean_cache_entries": cache, "memory_saved": 1 - cache / full_cache,
                            "identical_tokens_per_example": kept[method]})
        theirs = {m: v for m, v in kept.items() if m.startswith("kvpress-")}
        for method in (m for m in kept if is_ours(m) and theirs):
            ours = kept[method]

            def against(other: list[float], ours: list[float] = ours) -> dict[str, Any]:
                return {"difference": list(bootstrap_difference(ours, other)),
                        "longer_on": sum(a > b for a, b in zip(ours, other, strict=True)),
                        "shorter_on": sum(a < b for a, b in zip(ours, other, strict=True))}

            best = max(theirs, key=lambda m: sum(theirs[m]))
            each = {m: against(v) for m, v in theirs.items()}
            by_method.setdefault(method, {})[str(budget.size)] = {
                "ours": method, "best_kvpress": best, "quickmerge_minus_best": each[best]["difference"],
                "longer_on": each[best]["longer_on"], "shorter_on": each[best]["shorter_on"], "windows": len(ours),
                "quickmerge_vs_each": each}
    paired = by_method.get("quickmerge", next(iter(by_method.values()), {}))
    return {"protocol": "generation", "temperature": temperature, "examples": [e.title for e in examples],
            "summary": summary, "paired": paired, "paired_by_method": by_method}


def format_generation_table(results: dict[str, Any]) -> str:
    """Markdown table per size: tokens identical to no compression's continuation [95% CI], cache entries."""
    lines = ["| size | method | identical tokens after the first compression [95% CI] | identical to the end | "
             "cache entries | memory saved |", "|---|---|---|---|---|---|"]
    for r in sorted(results["summary"], key=lambda r: (r["decoding_size"], r["decoding_interval"] is not None,
                                                      -r["identical_tokens"])):
        lo, hi = r["identical_tokens_ci95"]
        lines.append(f"| {r['decoding_size']} | {r['method']} | {r['identical_tokens']:.1f} of {r['tokens_scored']} "
                     f"[{lo:.1f}, {hi:.1f}] | {r['identical_to_the_end']:.0%} | {r['mean_cache_entries']:.0f} | "
                     f"{r['memory_saved']:.0%} |")
    lines.append("")
    for method, paired in results.get("paired_by_method", {}).items():
        for size, p in paired.items():
            value, low, high = p["quickmerge_minus_best"]
            lines.append(f"size {size}: {method} - {p['best_kvpress']} (paired difference of identical tokens) "
                         f"{value:+.1f} [{low:+.1f}, {high:+.1f}], longer on {p['longer_on']}, shorter on "
                         f"{p['shorter_on']} of {p['windows']} windows")
    return "\n".join(lines)


def plot_generation_eval(results: dict[str, Any], path: str, title: str,
                         label: Callable[[str], str] = method_label) -> None:
    """Per size, two panels: the share of windows still identical to uncompressed generation k tokens after the
    first compression (one line per method, QuickMerge++ black and thick, dashed for another window), and each
    method's mean identical tokens with its 95% interval, most at the top, QuickMerge++ in red; no compression's
    (every token) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compressed = [r for r in results["summary"] if r["method"] != NONE]
    sizes = sorted({r["decoding_size"] for r in compressed})
    per_size = max(len([r for r in compressed if r["decoding_size"] == s]) for s in sizes)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(15, max(4.5, 0.45 * per_size + 2) * len(sizes)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})
    for (curve, bars), size in zip(axes, sizes, strict=True):
        rows = sorted((r for r in compressed if r["decoding_size"] == size), key=lambda r: r["identical_tokens"])
        scored = rows[0]["tokens_scored"]
        steps = torch.arange(scored + 1, dtype=torch.float64)
        for r in reversed(rows):
            kept = torch.tensor(r["identical_tokens_per_example"], dtype=torch.float64)
            still = (kept[None] >= steps[:, None]).double().mean(dim=1)  # [scored + 1]
            style = {"linewidth": 1.2}  # QuickMerge++ black: its defaults solid, another window dashed
            if is_ours(r["method"]):
                style = {"color": "black", "linewidth": 2.5, "zorder": 3,
                         "linestyle": "-" if r["method"] == "quickmerge" else "--"}
            curve.step(steps.tolist(), still.tolist(), where="post", label=label(r["method"]), **style)
        curve.set_xlabel("tokens generated after the first compression")
        curve.set_ylabel("share of windows still identical to uncompressed generation")
        curve.set_ylim(0, 1.02)
        curve.grid(alpha=0.3)
        curve.legend(fontsize=8)
        curve.set_title(f"back to {size} entries every {rows[0]['decoding_interval']} tokens", fontsize=9)
        interval_dots(bars, rows, "identical_tokens", "{:.1f}", lambda m: label(m).replace("kvpress ", ""))
        bars.axvline(scored, color="grey", lw=0.8, ls="--")
        bars.set_xlim(left=0)
        paired = results.get("paired", {}).get(str(size))
        note = ""
        if paired:
            value, low, high = paired["quickmerge_minus_best"]
            note = f"\nQuickMerge++ - best press, paired: {value:+.1f} [{low:+.1f}, {high:+.1f}] tokens"
        bars.set_title(f"mean identical tokens (of {scored}, dashed), 95% interval{note}", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
