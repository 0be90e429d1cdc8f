"""The replay recipe with per-head budgets (the flat cache layout) on the real SmolLM2-135M under eager and SDPA
attention: same 1,024-token Wikipedia window, perplexity of the next 64 tokens and the largest logit difference.
A correctness check of the eager path on a real model (the tests check it on tiny ones), not a timing.

    .venv/bin/python benchmarks/exploration/flat_layout_eager_vs_sdpa.py
"""
import torch
import transformers

from quickmerge.eval.text import wikipedia_windows
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import QuickMergePress
from quickmerge.text.cache import cache_kwargs


def main() -> None:
    torch.set_num_threads(2)
    model, tok = load_causal_lm("smollm2-135m")
    window = wikipedia_windows(tok, 1, 1024, 64, bos=False)[0].ids[None]
    context, continuation = window[:, :1024], window[:, 1024:]
    logits = {}
    for attn in ("sdpa", "eager"):
        model.set_attn_implementation(attn)
        press = QuickMergePress(0.5, scoring="replay", budget="replay", head_budgets=True, proportional=False)
        cache = transformers.DynamicCache()
        with torch.no_grad(), press(model):
            model.model(context, **cache_kwargs(model.model, cache))
            logits[attn] = model(continuation[:, :-1], **cache_kwargs(model, cache)).logits
        nll = torch.nn.functional.cross_entropy(logits[attn][0], continuation[0, 1:])
        print(f"{attn}: achieved ratio {press.achieved_ratio:.3f}, perplexity {float(nll.exp()):.4f}, "
              f"layer 0 row {tuple(cache.layers[0].keys.shape)}")
    print(f"max |logit difference| eager vs sdpa: {float((logits['eager'] - logits['sdpa']).abs().max()):.2e}")


if __name__ == "__main__":
    main()
