"""Replay scoring (quickmerge.text.replay) and QuickMergePress(scoring="replay") on tiny random-weight LMs."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import QuickMergePress  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from quickmerge.text.decoder import decoder_attention_layers, sliding_window_of  # noqa: E402
from quickmerge.text.replay import replay_attention, replay_inputs  # noqa: E402
from tests.text.tiny import tiny  # noqa: E402


# GQA with a short last chunk / MHA in one chunk / 3 query heads per KV head; a logit cap and sinks (Gemma 2, gpt-oss)
@pytest.mark.parametrize("h, hkv, chunk", [(4, 2, 2), (3, 3, 256), (6, 2, 4)])
@pytest.mark.parametrize("softcap, sinks", [(None, False), (0.7, False), (None, True), (0.7, True)])
def test_replay_attention_equals_a_per_query_reference(h, hkv, chunk, softcap, sinks):
    torch.manual_seed(0)
    b, length, n, d = 2, 7, 5, 8
    queries, keys = torch.randn(b, h, n, d), torch.randn(b, hkv, length + n, d)
    sink = torch.randn(h) * 2 if sinks else None
    got = replay_attention(queries, keys, length, 0.3, chunk=chunk, softcap=softcap, sinks=sink)
    want = torch.zeros(b, hkv, length)
    group = h // hkv
    for i in range(b):
        for q in range(h):
            for t in range(n):
                visible = keys[i, q // group, : length + t + 1]  # the prompt, then the replay up to itself
                logits = visible @ queries[i, q, t] * 0.3
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                if sinks:
                    logits = torch.cat([logits, sink[q : q + 1]])
                p = logits.softmax(0)[:length]
                want[i, q // group] = torch.maximum(want[i, q // group], p)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def _prefill(model, press, ids):
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
    return cache


def test_replay_leaves_only_prompt_entries_in_the_cache():
    """Dropping the others (epsilon ~ 0, no bias): every kept key is one of the prompt's own keys,
    never one of the replayed copies (which sit at other positions, so their RoPE keys differ)."""
    model = tiny("llama", layers=3)
    ids = torch.randint(0, 97, (1, 40))
    full = transformers.DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(model, full))
    press = QuickMergePress(0.5, scoring="replay", proportional=False, epsilon=1e-9)
    cache = _prefill(model, press, ids)
    assert press.achieved_ratio == pytest.approx(0.5)
    for merged, plain in zip(cache.layers, full.layers, strict=True):
        assert merged.keys.shape[2] == 20 and merged.get_seq_length() == 40
        distance = (merged.keys[0, :, :, None] - plain.keys[0, :, None]).norm(dim=-1)  # [Hkv, 20, 40]
        assert distance.amin(dim=-1).max() < 1e-4
        first = (distance[:, :4] < 1e-4).float().argmax(dim=-1)
        assert first.eq(torch.arange(4)).all()  # the attention sinks are kept, in order


@pytest.mark.parametrize("heads", [False, True])
def test_replay_keeps_the_recent_entries(heads):
    """recent=N: the prompt's last N entries are kept in every layer and head (dropping the others), which
    the replay scores alone do not do on this model."""
    model = tiny("llama", layers=3)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    full = transformers.DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(model, full))
    options = dict(scoring="replay", proportional=False, epsilon=1e-9)
    if heads:
        options.update(budget="replay", head_budgets=True)

    def last_kept(cache):  # [layers, Hkv, 12]: whether each of the last 12 prompt entries is in the cache
        out = []
        for merged, plain in zip(cache.layers, full.layers, strict=True):
            kept = merged.keys[0].reshape(-1, merged.keys.shape[-1])  # every head's entries (flat or not)
            last = plain.keys[0, :, -12:]  # [Hkv, 12, d]
            out.append((last[:, :, None] - kept[None, None]).norm(dim=-1).amin(dim=-1) < 1e-4)
        return torch.stack(out)

    assert not last_kept(_prefill(model, QuickMergePress(0.5, **options), ids)).all()
    assert last_kept(_prefill(model, QuickMergePress(0.5, **options, recent=12), ids)).all()


@pytest.mark.parametrize("heads", [False, True])
def test_a_layer_budget_that_cannot_hold_the_sinks_and_recent_entries_is_refused(heads):
    model = tiny("llama", layers=2)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    options = dict(scoring="replay", budget="replay", head_budgets=True) if heads else dict(scoring="replay")
    with pytest.raises(ValueError, match=r"sinks=4 and the last recent=8 entries \(12 of this prompt's 40\).*keeps 10"):
        _prefill(model, QuickMergePress(0.75, **options, recent=8, budget_floor=1.0), ids)
    _prefill(model, QuickMergePress(0.7, **options, recent=8, budget_floor=1.0), ids)  # 12 kept: they fit
    with pytest.raises(ValueError, match="sinks=4"):
        _prefill(model, QuickMergePress(0.95, **options), ids)  # 2 kept of 40: not even the sinks fit


def test_replay_scores_are_not_the_window_scores():
    model = tiny("llama", layers=2)
    ids = torch.randint(0, 97, (1, 48))
    window = _prefill(model, QuickMergePress(0.5, proportional=False, epsilon=1e-9), ids)
    replay = _prefill(model, QuickMergePress(0.5, scoring="replay", proportional=False, epsilon=1e-9), ids)
    assert not torch.allclose(window.layers[0].keys, replay.layers[0].keys)


def test_replay_prefix_is_read_before_the_prompt():
    model = tiny("llama", layers=2)
    ids = torch.randint(0, 97, (1, 40))
    plain = _prefill(model, QuickMergePress(0.5, scoring="replay", epsilon=1e-9), ids)
    prefixed = _prefill(model, QuickMergePress(0.5, scoring="replay", epsilon=1e-9, replay_prefix=(5, 6, 7)), ids)
    assert plain.layers[1].keys.shape == prefixed.layers[1].keys.shape
    assert not torch.allclose(plain.layers[1].keys, prefixed.layers[1].keys)
    with pytest.raises(ValueError, match="replay_prefix"), torch.no_grad():
        press = QuickMergePress(0.5, scoring="replay", replay_prefix=(5,))
        with press(model):
            model(inputs_embeds=model.model.embed_tokens(ids), **cache_kwargs(model, transformers.DynamicCache()))


def test_replay_inputs_move_positions_past_the_prompt():
    positions = torch.arange(5).expand(2, -1)
    replay = replay_inputs({"input_ids": torch.arange(10).view(2, 5), "position_ids": positions}, (7, 8))
    assert replay["input_ids"].tolist() == [[7, 8, 0, 1, 2, 3, 4], [7, 8, 5, 6, 7, 8, 9]]
    assert replay["position_ids"].tolist() == [list(range(5, 12))] * 2  # as the cache positions would give
    image = torch.tensor([[0, 1, 2, 2, 2, 2, 4], [0, 1, 2, 3, 4, 5, 6]])  # row 0: an image (2 x 2 grid) at 2
    rows, cols = torch.tensor([0, 0, 0, 0, 1, 1, 0]), torch.tensor([0, 0, 0, 1, 0, 1, 0])
    axes = torch.stack([image, image + rows, image + cols])
    moved = replay_inputs({"inputs_embeds": torch.zeros(2, 7, 3), "position_ids": axes})["position_ids"]
    assert torch.equal(moved, axes + torch.tensor([5, 7]).view(1, 2, 1))  # per row, past its largest position


@pytest.mark.parametrize("heads", [False, True])
def test_replay_on_gemma3_scores_the_global_layers_and_restores_the_sliding_ones(heads):
    """The replay passes through the sliding-window layers too; their caches come back as the prefill left
    them, so decoding equals one token at a time and the sliding layers equal an unpressed prefill's."""
    model = tiny("gemma3", layers=4)
    ids, cont = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 5))
    plain = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, plain))
    press = QuickMergePress(0.5, scoring="replay", budget="replay", head_budgets=heads)
    cache, again = transformers.DynamicCache(config=model.config), transformers.DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
        for layer, reference in zip(cache.layers, plain.layers, strict=True):
            if layer.is_sliding:
                assert torch.equal(layer.keys, reference.keys)
        at_once = model(cont, **cache_kwargs(model, cache)).logits
        model(ids, **cache_kwargs(model, again))
        steps = torch.cat([model(cont[:, t : t + 1], **cache_kwargs(model, again)).logits for t in range(5)], 1)
    assert press.achieved_ratio == pytest.approx(0.5)
    assert torch.allclose(at_once, steps, atol=1e-5)


def test_replay_option_errors():
    with pytest.raises(ValueError, match="scoring"):
        QuickMergePress(0.5, scoring="recall")
    with pytest.raises(ValueError, match="scoring='replay'"):
        QuickMergePress(0.5, budget="replay")
    with pytest.raises(ValueError, match="sinks"):
        QuickMergePress(0.5, scoring="replay", sinks=-1)
    with pytest.raises(ValueError, match="recent"):
        QuickMergePress(0.5, scoring="replay", recent=-1)
    with pytest.raises(ValueError, match=r"recent.*scoring='replay'"):
        QuickMergePress(0.5, recent=8)


# ---- head budgets: the flat layout (quickmerge.text.flat) ------------------------------------------


class _EvenSplit(QuickMergePress):
    """Replay scores replaced by each head's own quantile ranks: the top Hkv x K over all heads of a
    layer is then exactly the top K of every head, the rectangular press's choice."""

    def rescore(self, base, cache, attentions, scores, prompt):
        ranks = super().rescore(base, cache, attentions, scores, prompt)
        self._replayed = {i: r.clone() for i, r in ranks.items()}
        return ranks


@pytest.mark.parametrize("proportional", [True, False])
@pytest.mark.parametrize(("kind", "attn"), [("llama", "sdpa"), ("llama", "eager"), ("gpt-oss", "eager"),
                                            ("gemma2", "eager"), ("gemma3n", "eager"), ("gemma4-shared", "sdpa")])
def test_flat_layout_with_an_even_split_equals_the_rectangular_cache(kind, attn, proportional):
    """Eager attention reads the flat layout too: gpt-oss (attention sinks, no SDPA path) and Gemma 2 (logit cap)
    among them, their sliding layers left whole; Gemma 3n's and Gemma 4's layers reading an earlier layer's cache
    read its row under its mask."""
    model = tiny(kind, attn, layers=3)
    assert model.config._attn_implementation == attn
    ids, cont = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 6))
    logits = []
    for heads in (False, True):
        press = _EvenSplit(0.5, scoring="replay", head_budgets=heads, proportional=proportional)
        cache = transformers.DynamicCache()
        with torch.no_grad(), press(model):
            model(ids, **cache_kwargs(model, cache))
            shapes = {tuple(layer.keys.shape) for layer, a in zip(cache.layers, decoder_attention_layers(model),
                                                                 strict=True) if sliding_window_of(a) is None}
            logits.append(model(cont, **cache_kwargs(model, cache)).logits)
        d = max(a.head_dim for a in decoder_attention_layers(model))  # Gemma 4's global heads are wider
        assert shapes == ({(2, 1, 40, d)} if heads else {(2, 2, 20, d)})
    assert torch.allclose(logits[0], logits[1], atol=1e-5), (logits[0] - logits[1]).abs().max()


def test_flat_layout_keeps_equal_memory_positions_and_decodes_consistently():
    model = tiny("llama", layers=4)
    with torch.no_grad():  # a sharp layer, so that the heads' and layers' budgets differ
        model.model.layers[0].self_attn.q_proj.weight.mul_(30.0)
    ids, cont = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 6))
    press = QuickMergePress(0.5, scoring="replay", budget="replay", head_budgets=True)
    cache, again = transformers.DynamicCache(), transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
        entries = [layer.keys.shape[2] for layer in cache.layers]
        owners = [torch.isfinite(layer.log_sizes[0, ::2, 0]).sum(-1) for layer in cache.layers]  # per KV head
        at_once = model(cont, **cache_kwargs(model, cache)).logits
        model(ids, **cache_kwargs(model, again))
        steps = torch.cat([model(cont[:, t : t + 1], **cache_kwargs(model, again)).logits for t in range(6)], 1)
    assert sum(entries) == 4 * 2 * 20 and press.achieved_ratio == pytest.approx(0.5)  # = the rectangle's memory
    assert len({tuple(o.tolist()) for o in owners}) > 1  # the heads' shares differ between layers
    assert all(int(o.sum()) == e for o, e in zip(owners, entries, strict=True))
    assert cache.get_seq_length() == 46 and cache.layers[1].keys.shape[2] == entries[1] + 2 * 6
    assert torch.allclose(at_once, steps, atol=1e-5)
    with pytest.raises(RuntimeError, match="inside"), torch.no_grad():  # outside the press: refused, not wrong
        model(cont, **cache_kwargs(model, cache))


def test_flat_layout_needs_float_masks_and_replay_scores():
    model = tiny("llama")
    model.config._attn_implementation_internal = "flex_attention"  # the check runs before any attention
    press = QuickMergePress(0.5, scoring="replay", head_budgets=True, proportional=False)
    with pytest.raises(ValueError, match=r"one cache row: head_budgets=True.*'flex_attention'"), press(model):
        model(torch.randint(0, 97, (1, 20)), **cache_kwargs(model, transformers.DynamicCache()))
    with pytest.raises(ValueError, match="head_budgets"):
        QuickMergePress(0.5, head_budgets=True)


class _Recorded(QuickMergePress):
    """Keeps what :meth:`rescore` handed to the selection, and the replay scores it started from."""

    def rescore(self, base, cache, attentions, scores, prompt):
        ranks = super().rescore(base, cache, attentions, scores, prompt)
        self.recorded = {i: (r.clone(), self._replayed[i].clone()) for i, r in ranks.items()}
        return ranks


def test_replay_pool_ranks_each_entry_by_its_neighbourhood():
    """replay_pool=k: the selection ranks each entry by the largest (sink-marked) replay score within k//2
    positions, and the budgets read the pooled scores; the cache then differs from unpooled replay's."""
    from quickmerge.primitives import quantile_rank
    from quickmerge.text.scoring import neighbourhood_max

    model = tiny("llama", layers=3)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(5))
    options = dict(scoring="replay", budget="replay", head_budgets=True, proportional=False)
    plain, pooled = _Recorded(0.5, **options), _Recorded(0.5, **options, replay_pool=5)
    caches = [_prefill(model, press, ids) for press in (plain, pooled)]
    for i, (_, raw) in plain.recorded.items():
        ranks, pooled_raw = pooled.recorded[i]
        assert torch.equal(pooled_raw, neighbourhood_max(raw, 5))
        assert torch.equal(ranks, quantile_rank(pooled_raw))
    assert pooled.achieved_ratio == pytest.approx(0.5)
    assert any(a.keys.shape != b.keys.shape or not torch.allclose(a.keys, b.keys)
               for a, b in zip(caches[0].layers, caches[1].layers, strict=True))


@pytest.mark.parametrize("kind", ["llama", "phi3", "smollm3", "gemma3"])
def test_prerope_keys_give_the_cached_keys_after_the_rotary_embedding(kind):
    """What the leverage reserve scores: the layer's keys before RoPE (after Gemma 3's key norm)."""
    from quickmerge.text.decoder import apply_rope, decoder_attention_layers, key_rotation, prerope_keys

    model = tiny(kind, layers=3)
    ids = torch.randint(0, 97, (1, 12))
    seen = {}

    def keep(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        seen[module.layer_idx] = (prerope_keys(module, hidden), kwargs["position_embeddings"], hidden)

    handles = [a.register_forward_pre_hook(keep, with_kwargs=True) for a in decoder_attention_layers(model)]
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    for handle in handles:
        handle.remove()
    for i, layer in enumerate(cache.layers):
        keys, (cos, sin), _ = seen[i]
        n = layer.keys.shape[2]  # a sliding layer holds its window's last entries only
        attention = decoder_attention_layers(model)[i]  # SmolLM3: every second layer has no rotary embedding
        rotation = key_rotation(attention, seen[i][2], layer.keys, (cos, sin))
        assert rotation == ("half" if getattr(attention, "use_rope", True) else "none")
        assert torch.allclose(apply_rope(keys, cos, sin, rotation)[:, :, -n:], layer.keys, atol=1e-5)


@pytest.mark.parametrize("heads", [False, True])
def test_leverage_reserve_keeps_the_highest_leverage_keys(heads):
    """leverage=s: in every head the int(s x even budget) entries of highest pre-RoPE key leverage get the top
    replay score (so they are kept: dropping the rest, their keys are in the cache); off, some are not."""
    from quickmerge.text.scoring import key_leverage

    model = tiny("llama", layers=3)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(7))
    options = dict(scoring="replay", proportional=False, epsilon=1e-9, replay_pool=3)
    if heads:
        options.update(budget="replay", head_budgets=True)
    full = transformers.DynamicCache()
    seen = {}

    def keep(module, args, kwargs):
        from quickmerge.text.decoder import prerope_keys

        seen[module.layer_idx] = key_leverage(prerope_keys(module, kwargs["hidden_states"]))

    handles = [layer.self_attn.register_forward_pre_hook(keep, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(ids, **cache_kwargs(model, full))
    for handle in handles:
        handle.remove()
    reserved = int(0.5 * 20)

    def outliers_kept(cache):
        out = []
        for i, (merged, plain) in enumerate(zip(cache.layers, full.layers, strict=True)):
            kept = merged.keys[0].reshape(-1, merged.keys.shape[-1])
            best = seen[i][0].topk(reserved, dim=-1).indices  # [Hkv, reserved]
            outliers = plain.keys[0].gather(1, best[..., None].expand(-1, -1, plain.keys.shape[-1]))
            out.append((outliers[:, :, None] - kept[None, None]).norm(dim=-1).amin(dim=-1) < 1e-4)
        return torch.stack(out)

    press = _Recorded(0.5, **options, leverage=0.5)
    assert outliers_kept(_prefill(model, press, ids)).all()
    assert press.achieved_ratio == pytest.approx(0.5)
    for i, (_, raw) in press.recorded.items():
        best = seen[i].topk(reserved, dim=-1).indices
        assert (raw.gather(-1, best) == raw.amax()).all()
    assert not outliers_kept(_prefill(model, QuickMergePress(0.5, **options), ids)).all()


def test_leverage_pool_reserves_spans_around_the_strongest_outliers():
    """leverage_pool=k: the reserve is the top of the k-wide max-pooled leverage, i.e. the neighbours of the
    strongest outliers; those entries carry the top replay score, and the cache differs from the unpooled reserve's."""
    from quickmerge.primitives import top_indices
    from quickmerge.text.decoder import prerope_keys
    from quickmerge.text.scoring import key_leverage, neighbourhood_max

    model = tiny("llama", layers=2)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(9))
    seen = {}

    def keep(module, args, kwargs):
        seen[module.layer_idx] = neighbourhood_max(key_leverage(prerope_keys(module, kwargs["hidden_states"])), 5)

    handles = [layer.self_attn.register_forward_pre_hook(keep, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    options = dict(scoring="replay", budget="replay", head_budgets=True, proportional=False, epsilon=1e-9,
                   leverage=0.5)
    pooled, plain = _Recorded(0.5, **options, leverage_pool=5), _Recorded(0.5, **options)
    caches = [_prefill(model, press, ids) for press in (pooled, plain)]
    for i, (_, raw) in pooled.recorded.items():
        best = top_indices(seen[i], 10)  # plateaus of the pooled leverage tie: lowest index first
        assert (raw.gather(-1, best) == raw.amax()).all()
    assert any(a.keys.shape != b.keys.shape or not torch.allclose(a.keys, b.keys)
               for a, b in zip(caches[0].layers, caches[1].layers, strict=True))


def test_leverage_errors():
    with pytest.raises(ValueError, match="leverage"):
        QuickMergePress(0.5, scoring="replay", leverage=1.5)
    with pytest.raises(ValueError, match=r"leverage.*scoring='replay'"):
        QuickMergePress(0.5, leverage=0.2)
    with pytest.raises(ValueError, match="leverage_pool must be odd"):
        QuickMergePress(0.5, scoring="replay", leverage=0.2, leverage_pool=4)
    with pytest.raises(ValueError, match=r"leverage_pool.*leverage > 0"):
        QuickMergePress(0.5, scoring="replay", leverage_pool=9)
    with pytest.raises(ValueError, match="leverage_ridge"):
        QuickMergePress(0.5, scoring="replay", leverage=0.2, leverage_ridge=0.0)


def test_replay_pool_errors():
    with pytest.raises(ValueError, match="replay_pool"):
        QuickMergePress(0.5, scoring="replay", replay_pool=0)
    with pytest.raises(ValueError, match="replay_pool must be odd"):
        QuickMergePress(0.5, scoring="replay", replay_pool=4)
    with pytest.raises(ValueError, match=r"replay_pool.*scoring='replay'"):
        QuickMergePress(0.5, replay_pool=5)
