"""Replay scoring: which cached entries the model reads when it goes over the prompt again.

A window of the prompt's last queries only sees what the end of the prompt needs; a fact
stated mid-prompt that the continuation will copy gets little of their attention. Reading
the whole prompt a second time on top of its own cache (KVzip's context reconstruction,
arXiv 2505.23416) asks every cached entry whether some later token needs it: while the
model re-reads token ``t``, its copying heads attend to the first ``t`` and its neighbours.
Each entry's score is the most attention any re-reading query pays it. The replayed
entries are removed from the cache afterwards, so the cache ends as the prefill left it.

Cost: one more forward pass over the prompt, with a cache twice as long, plus the scores: on
SmolLM2-135M a 1,024-token prefill with pooled replay scoring takes about 4x the uncompressed
prefill on 2 CPU cores, a quarter to a third of it in :func:`replay_attention` (BENCHMARKS.md).
The scores are taken in query chunks, so memory stays ``(query heads per KV head) x chunk x 2L``
floats per KV head.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from .cache import cache_kwargs
from .decoder import (
    attention_scale,
    hidden_states_arg,
    key_rotation,
    logit_cap_and_sinks,
    window_queries,
)
from .latent import attended_keys, caches_latent
from .scoring import soft_capped


def replay_attention(
    queries: Tensor, keys: Tensor, length: int, scaling: float, chunk: int = 256, *,
    softcap: float | None = None, sinks: Tensor | None = None,
) -> Tensor:
    """Most attention each of the first ``length`` keys receives from replayed queries, ``[B, Hkv, length]``.

    Args:
        queries: ``[B, H, n, d]`` post-RoPE queries of the ``n`` replayed tokens.
        keys: ``[B, Hkv, length + n, d]``: the prompt's entries, then the replayed tokens' own.
        length: prompt entries (every replayed query sees all of them, and the replayed
            tokens up to itself).
        scaling: the attention's logit scale; ``softcap``: its logit cap (Gemma 2), ``sinks [H]``: its
            per-head sink logits (gpt-oss), both as the model applies them.
    Maximum over the replayed queries and over the query heads that share each KV head (float32).
    """
    b, h, n, d = queries.shape
    hkv = keys.shape[1]
    group = h // hkv
    k = keys.float()
    grouped = queries.view(b, hkv, group, n, d)  # the query heads that read each KV head, side by side
    best = torch.full((b, hkv, length), float("-inf"), device=keys.device)
    for start in range(0, n, chunk):
        c = min(chunk, n - start)
        end = length + start + c  # no query of this chunk sees past it
        q = grouped[:, :, :, start : start + c].float().reshape(b, hkv, group * c, d)
        logits = torch.matmul(q, k[:, :, :end].transpose(-1, -2)).mul_(scaling)  # [B, Hkv, group * c, end]
        logits = soft_capped(logits, softcap)
        own = logits[..., length + start :].view(b, hkv, group, c, c)  # the chunk's own replayed tokens
        own.masked_fill_(torch.ones(c, c, dtype=torch.bool, device=keys.device).triu_(1), float("-inf"))
        # softmax is exp(logit - logsumexp) and exp is monotone: take the maximum in the log domain
        total = logits.logsumexp(dim=-1, keepdim=True)
        if sinks is not None:  # a sink shares each query head's softmax
            sink = sinks.float().view(1, hkv, group, 1, 1).expand(1, hkv, group, c, 1).reshape(1, hkv, group * c, 1)
            total = torch.logaddexp(total, sink)
        log_probs = logits[..., :length] - total
        best = torch.maximum(best, log_probs.amax(dim=2))
    return best.exp()


def replay_inputs(prompt: dict[str, Any], prefix: tuple[int, ...] = ()) -> dict[str, Any]:
    """The decoder stack's inputs that read ``prompt`` (:func:`~quickmerge.text.kv_press.prompt_inputs`) again
    right after itself, behind the token ids ``prefix``.

    Given positions ``P`` (``[B, n]``, or ``[A, B, n]`` on A axes) move on by ``max(P) + 1`` per row, so the replayed
    tokens stand to each other, and to the prompt, as the prompt's own do (an image keeps its grid); image features
    added inside the stack (Qwen3-VL's DeepStack) are added again.
    """
    replay, p = dict(prompt), len(prefix)
    if p:
        if "input_ids" not in replay:
            raise ValueError("replay_prefix holds token ids: the prompt must be given as input_ids")
        ids = replay["input_ids"]
        replay["input_ids"] = torch.cat([torch.tensor(prefix, dtype=ids.dtype, device=ids.device).expand(len(ids), -1),
                                         ids], dim=1)
    positions = prompt.get("position_ids")
    if positions is not None:
        start = positions.amax(dim=-1, keepdim=True)
        start = (start.amax(dim=0, keepdim=True) if positions.ndim == 3 else start) + 1
        ahead = torch.arange(p, device=positions.device, dtype=positions.dtype) + start
        replay["position_ids"] = torch.cat([ahead.expand(*positions.shape[:-1], p), positions + start + p], dim=-1)
    return replay


def replay_scores(
    base: nn.Module, cache: object, attentions: dict[int, nn.Module], replay: dict, length: int, chunk: int = 256
) -> dict[int, Tensor]:
    """Run ``base`` (the decoder stack) once more over ``replay`` with ``cache`` and score the prompt.

    Args:
        base: the model's decoder stack (``model.model``), called with the prompt and ``cache``.
        cache: the prefill's cache, ``length`` entries per layer in ``attentions``; it is cut back to
            ``length`` afterwards (what the replay appended is removed), and every other layer
            (sliding windows) gets its state back.
        attentions: ``{layer index: attention module}`` of the layers to score.
        replay: the decoder stack's inputs for the replayed prompt (:func:`replay_inputs`).
    Returns ``{layer: [B, Hkv, length]}``: the :func:`replay_attention` of each layer.
    """
    scores: dict[int, Tensor] = {}

    def score(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        hidden = hidden_states_arg(args, kwargs)
        layer = cache.layers[module.layer_idx]
        keys = attended_keys(module, layer.keys, layer.values)
        pe = kwargs.get("position_embeddings")
        queries = window_queries(module, hidden, kwargs, key_rotation(module, hidden, keys, pe))
        cap, sinks = logit_cap_and_sinks(module)
        most = replay_attention(queries, keys, length, attention_scale(module), chunk, softcap=cap, sinks=sinks)
        # a cached latent is one row for every head: the most attention any of them pays an entry
        latent = caches_latent(module, layer.keys, layer.values)
        scores[module.layer_idx] = most.amax(dim=1, keepdim=True) if latent else most

    handles = [attn.register_forward_hook(score, with_kwargs=True) for attn in attentions.values()]
    # Layers not scored (sliding windows, linear attention, state-space blocks) would take the replay in, and so would
    # the fixed-size state a scored layer may hold beside its keys (Falcon-H1's): put their state back.
    saved = {i: _state(layer) for i, layer in enumerate(cache.layers) if i not in attentions or _fixed_state(layer)}
    try:
        with torch.no_grad():
            base(**replay, **cache_kwargs(base, cache), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
        for i, layer in enumerate(cache.layers):
            if i in saved:
                layer.__dict__.clear()
                layer.__dict__.update(saved[i])
                continue
            extra = layer.get_seq_length() - length
            if extra > 0:
                layer.crop(-extra)  # a negative crop removes that many entries in every transformers 5.x
    missing = sorted(set(attentions) - set(scores))
    if missing:
        raise RuntimeError(f"the replay pass did not reach attention layers {missing}: cannot score them")
    return scores


def _fixed_state(layer: Any) -> bool:
    """Whether a cache layer holds a hybrid layer's fixed-size state (``conv_states``, ``recurrent_states``)."""
    return "conv_states" in layer.__dict__


def _state(layer: Any) -> dict:
    """What a cache layer holds, to put back after the replay: a shallow copy where updates rebind tensors
    (attention layers' keys and values, sliding windows); copies of a hybrid layer's fixed-size states (linear
    attention, state-space blocks, convolutions: ``conv_states``, ``recurrent_states``), updated in place."""
    state = dict(layer.__dict__)
    if _fixed_state(layer):
        state.update({name: copy.deepcopy(value) for name, value in state.items() if name not in ("keys", "values")})
    return state
