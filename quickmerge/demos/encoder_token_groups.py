"""Demo: which words of real text QuickMerge++ merges together, on a real encoder (``quickmerge demo-encoder``).

Encodes real Wikipedia text with all-MiniLM-L6-v2, computes saliency from the
entropy of its real attention maps across its 6 layers, compresses the token
states with :class:`QuickMergePP` and prints which words were merged together,
the ratio achieved, and how faithful the merge is next to ToMe-style matching
and uniform pooling.
"""

from __future__ import annotations

import textwrap

import torch

from ..baselines import tome_merge, uniform_pool
from ..data import wikipedia_articles
from ..merging import MergeResult, merge_mass
from ..pipeline import QuickMergePP
from ..pretrained.encoder import encode, load_encoder, word_pieces_to_text


def demo_text(max_tokens: int = 120) -> str:
    """The first sentences of the first Wikipedia article, at most ``max_tokens`` words-ish."""
    words: list[str] = []
    for sentence in wikipedia_articles()[0].text.replace("\n\n", " ").split(". "):
        if len(words) + len(sentence.split()) > max_tokens * 3 // 4:
            break
        words += (sentence + ".").split()
    return " ".join(words)


def relative_error(x: torch.Tensor, approx: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """``sum_i w_i ||x_i - x^_i||^2 / sum_i w_i ||x_i||^2`` over ``[B, N, D]`` tokens (w = 1 if None)."""
    err, ref = (x - approx).pow(2).sum(-1), x.pow(2).sum(-1)
    if weight is not None:
        err, ref = err * weight, ref * weight
    return float(err.sum() / ref.sum())


def describe_groups(tokens: list[str], result: MergeResult, limit: int = 12) -> list[str]:
    """One line per multi-token group (largest first): its seed and the tokens merged into it."""
    assignment, seeds = result.assignment[0].tolist(), result.seeds[0].tolist()
    members: dict[int, list[int]] = {}
    for i, g in enumerate(assignment):
        members.setdefault(g, []).append(i)
    lines = []
    for g in sorted(members, key=lambda g: -len(members[g]))[:limit]:
        if len(members[g]) < 2:
            break
        words = ", ".join(tokens[i] for i in members[g] if i != seeds[g])
        lines.append(f"  [{tokens[seeds[g]]}] <- {words}")
    return lines


def render_spans(tokens: list[str], result: MergeResult) -> str:
    """The text with each contiguous merged span in brackets (causal mode)."""
    spans: list[list[str]] = []
    previous = -1
    for token, group in zip(tokens, result.assignment[0].tolist(), strict=True):
        if group != previous:
            spans.append([])
            previous = group
        spans[-1].append(token)
    return " ".join(f"[{word_pieces_to_text(s)}]" if len(s) > 1 else s[0] for s in spans)


def run(text: str | None = None, keep: float = 0.25) -> dict[str, float]:
    """Run the demo and print its report; returns the figures it printed."""
    torch.manual_seed(0)
    model, tokenizer = load_encoder()
    text = demo_text() if text is None else text
    enc = encode(model, tokenizer, text)
    x, n, d = enc.hidden, enc.hidden.shape[1], enc.hidden.shape[2]
    k = max(1, round(n * keep))
    layers = len(enc.attentions)

    quickmerge = QuickMergePP(embedding_dim=d, num_layers=layers).eval()
    with torch.no_grad():
        merged, losses = out = quickmerge(x, k, attentions=enc.attentions)
    result, saliency = out.merge, out.saliency
    mass = merge_mass(result.mask, saliency, quickmerge.merger.epsilon)

    tome, tome_assign, _ = tome_merge(x, k)
    pooled, pool_assign, _ = uniform_pool(x, k)
    gather = lambda t, a: t.gather(1, a[..., None].expand(-1, -1, d))  # noqa: E731
    figures = {
        "tokens_in": n,
        "tokens_out": merged.shape[1],
        "ratio": merged.shape[1] / n,
        "retention": float(quickmerge.fidelity.retention(x, merged, result.sizes)[0]),
        "error_quickmerge": relative_error(x, result.unmerge()),
        "error_tome": relative_error(x, gather(tome, tome_assign)),
        "error_pool": relative_error(x, gather(pooled, pool_assign)),
        "mass_error_quickmerge": relative_error(x, result.unmerge(), mass),
        "mass_error_tome": relative_error(x, gather(tome, tome_assign), mass),
        "mass_error_pool": relative_error(x, gather(pooled, pool_assign), mass),
    }

    top = saliency[0].topk(min(10, n)).indices.tolist()
    print(f"Text ({n} tokens, all-MiniLM-L6-v2, {layers} layers):")
    print(textwrap.indent(textwrap.fill(text, 96), "  "))
    print(f"\nSaliency from the entropy of {layers} real attention layers; most salient tokens:")
    print("  " + ", ".join(enc.tokens[i] for i in top))
    print(f"\nQuickMerge++ merged {n} tokens into {k} (keep ratio {figures['ratio']:.2f}, {n / k:.1f}x fewer).")
    print("Largest groups, [seed] <- tokens merged into it:")
    print("\n".join(describe_groups(enc.tokens, result)))

    causal = QuickMergePP(embedding_dim=d, num_layers=layers, causal=True).eval()
    with torch.no_grad():
        spans = causal.compress(x, k, saliency=saliency)[0]
    print("\nOrder-preserving (causal) mode, each [bracket] is one merged token:")
    print(textwrap.indent(textwrap.fill(render_spans(enc.tokens, spans), 96), "  "))

    print("\nFidelity (relative squared reconstruction error after unmerging; lower is better):")
    print(f"  {'':28s}{'all tokens':>12s}{'mass-weighted':>15s}")
    for name, key in [("QuickMerge++", "quickmerge"), ("ToMe-style matching", "tome"), ("uniform pooling", "pool")]:
        print(f"  {name:28s}{figures['error_' + key]:12.3f}{figures['mass_error_' + key]:15.3f}")
    print(f"  norm-mass retention of QuickMerge++: {figures['retention']:.3f} (gamma = {quickmerge.fidelity.gamma})")
    print(f"  losses: L_AR = {float(losses['ar']):.3f}, fidelity = {float(losses['fidelity']):.3f}")
    return figures
