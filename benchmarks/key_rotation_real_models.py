"""Real checkpoints: the rotation the presses read off each layer's cached keys, and its margin.

For each model and dtype, an 82-token prompt is run once; on every decoder layer the keys of the
last 4 tokens recomputed from the layer's projections (``quickmerge.text.decoder.key_rotation``)
are compared with the keys the layer cached. ``max_relative_error`` is the largest relative error
of the rotation found, to set against ``ROTATION_TOLERANCE``.

    python benchmarks/key_rotation_real_models.py smollm2-135m gemma3-270m
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


def check(name: str, dtype: torch.dtype) -> dict:
    model, tok = load_causal_lm(name, dtype=dtype)
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
        rotation = key_rotation(attention, hidden, cache.layers[i].keys, (cos, sin))
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
    parser.add_argument("--out", default="docs/results/text/key_rotation_real_models.json")
    args = parser.parse_args()
    out = {}
    for name in args.models:
        for dtype in (torch.float32, torch.bfloat16):
            out[f"{name}/{str(dtype).removeprefix('torch.')}"] = result = check(name, dtype)
            print(name, dtype, result, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
