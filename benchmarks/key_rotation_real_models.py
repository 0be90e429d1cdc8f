"""Real checkpoints: the rotation the presses read off each layer's cached keys, and its margin.

For each model and dtype, a prompt is run once (an 82-token sentence, or with ``--wikipedia`` the
third 1,024-token window of the Wikipedia dump); on every decoder layer the keys of the last 4
tokens recomputed from the layer's projections (``quickmerge.text.decoder.key_rotation``) are
compared with the keys the layer cached. ``max_relative_error`` is the largest relative error of
the rotation found, to set against ``ROTATION_TOLERANCE``; a model that overflows by itself (Gemma 3
in float16) is reported as such.

    python benchmarks/key_rotation_real_models.py smollm2-135m gemma3-270m
    python benchmarks/key_rotation_real_models.py smollm2-135m gemma3-270m --wikipedia --dtypes float32 bfloat16 \
        float16 --out docs/results/text/key_rotation_real_models_wikipedia.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers

from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text.cache import cache_kwargs
from quickmerge.text.decoder import ROTATION_TOLERANCE, apply_rope, decoder_attention_layers, heads, key_rotation


def check(name: str, dtype: torch.dtype, wikipedia: bool = False) -> dict:
    model, tok = load_causal_lm(name, dtype=dtype)
    if wikipedia:
        from quickmerge.eval.text import wikipedia_windows
        from quickmerge.pretrained.causal_lm import needs_bos

        ids = wikipedia_windows(tok, 3, 1024, 0, bos=needs_bos(name))[2].ids[None, :1024]
    else:
        ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids
    inputs = {}

    def keep(module, args, kwargs):
        inputs[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    attentions = decoder_attention_layers(model)
    handles = [a.register_forward_pre_hook(keep, with_kwargs=True) for a in attentions]
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    for handle in handles:
        handle.remove()
    rotations, errors = [], []
    for i, attention in enumerate(attentions):
        hidden, (cos, sin) = inputs[i]
        try:
            rotation = key_rotation(attention, hidden, cache.layers[i].keys, (cos, sin))
        except ValueError as err:  # the model's own keys are not finite
            return {"error": str(err), "prompt_tokens": ids.shape[1]}
        target = cache.layers[i].keys[:, :, -4:].float()
        with torch.no_grad():
            mine = apply_rope(heads(attention, hidden[:, -4:], "k").float(), cos[:, -4:].float(),
                              sin[:, -4:].float(), rotation)
        errors.append(float((mine - target).norm() / target.norm()))
        rotations.append(rotation)
    return {"rotations": sorted(set(rotations)), "layers": len(rotations), "max_relative_error": max(errors),
            "tolerance": ROTATION_TOLERANCE, "prompt_tokens": ids.shape[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="names load_causal_lm knows (smollm2-135m, gemma3-270m)")
    parser.add_argument("--wikipedia", action="store_true", help="a 1,024-token Wikipedia window as the prompt")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", default="docs/results/text/key_rotation_real_models.json")
    args = parser.parse_args()
    out = {}
    for name in args.models:
        for dtype in (getattr(torch, d) for d in args.dtypes):
            out[f"{name}/{str(dtype).removeprefix('torch.')}"] = result = check(name, dtype, args.wikipedia)
            print(name, dtype, result, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
