"""Merging while decoding (``QuickMergePress(decoding_size=...)``) on tiny random-weight causal LMs: the cache stays
within its bounds, sizes and positions add up, decoding after merges equals an unpatched model on the duplicated
cache, batch rows stay independent, and the options it cannot work with are refused."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import QuickMergePress  # noqa: E402
from quickmerge.text.cache import cache_kwargs, is_merged, physical_length  # noqa: E402
from quickmerge.text.decoder import UnsupportedAttentionError  # noqa: E402
from quickmerge.text.decoding import entry_sizes, remerge  # noqa: E402
from quickmerge.text.scoring import Window, attention_probs, saliency  # noqa: E402
from tests.text.tiny import duplicated_cache, greedy_loop, tiny, too_old  # noqa: E402

SIZE, INTERVAL = 12, 8


def _full_layers(cache):
    return [layer for layer in cache.layers if not getattr(layer, "is_sliding", False)]


@torch.no_grad()
def _decode(model, press, ids, cont, *, check=None, configured=False):
    """Prefill ``ids`` and decode ``cont`` one token per call inside ``press``; ``check(cache, step)`` after each
    call. ``configured``: the cache made from the model's config (as ``generate`` makes it; hybrids need it).
    Returns the logits ``[B, T, V]`` and the cache."""
    cache = transformers.DynamicCache(config=model.config) if configured else transformers.DynamicCache()
    logits = []
    with press(model):
        model(ids, **cache_kwargs(model, cache))
        for t in range(cont.shape[1]):
            logits.append(model(cont[:, t : t + 1], **cache_kwargs(model, cache)).logits)
            if check is not None:
                check(cache, t)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("kind", ["llama", "qwen3", "phi3", "smollm3", "gemma3"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_the_cache_stays_within_its_bounds_and_decodes_like_the_duplicated_cache(kind, attn, ratio):
    """Every full-attention layer holds between SIZE and SIZE + INTERVAL entries once decoding reaches them, its
    entries stand for every token so far, positions continue, and after several merges the press decodes exactly as
    an unpatched model on a cache holding each merged entry ``size`` times (proportional attention's definition)."""
    model = tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 40))
    press = QuickMergePress(ratio, window=4, decoding_size=SIZE, decoding_interval=INTERVAL)
    seen = []

    def check(cache, step):
        tokens = ids.shape[1] + step + 1
        assert cache.get_seq_length() == tokens
        for layer in _full_layers(cache):
            length = physical_length(layer)
            assert length < SIZE + INTERVAL
            if is_merged(layer) and layer.log_sizes is not None:
                sizes = entry_sizes(layer.log_sizes, layer.keys.shape[1], length, layer.keys)
                assert torch.allclose(sizes.sum(-1), torch.full_like(sizes[..., 0], tokens))
        seen.append(press.decoding_merges)

    _, cache = _decode(model, press, ids, cont, check=check)
    full = len(_full_layers(cache))
    # first merge when the cache reaches SIZE + INTERVAL: at 0.5 the prompt keeps 8 of 16, at 0.0 all 16
    kept = 8 if ratio else 16
    first = SIZE + INTERVAL - kept - 1
    assert seen[first - 1] == 0 and seen[first] == full
    assert seen[-1] == full * (1 + (cont.shape[1] - 1 - first) // INTERVAL)
    oracle = duplicated_cache(cache)
    nxt = torch.randint(0, 97, (2, 3))
    with torch.no_grad():
        with press(model):
            merged = model(nxt, **cache_kwargs(model, cache)).logits
        reference = model(nxt, **cache_kwargs(model, oracle)).logits
    assert torch.allclose(merged, reference, atol=1e-5), (merged - reference).abs().max()


@pytest.mark.parametrize("kind", ["mixtral", "gemma2", "cohere2", "gpt-oss", "lfm2", "qwen3.5", "granite4"])
def test_more_families_decode_like_the_duplicated_cache_after_merges(kind):
    """Alternating sliding layers (left alone), attention sinks (gpt-oss), hybrids whose other layers keep a fixed-size
    state (transformers 5.5 or later: before, they keep their own cache class, refused on entry)."""
    from tests.text.test_hybrid import CLASSES, _hybrid

    model = _hybrid(kind) if kind in CLASSES else tiny(kind, "sdpa")  # hybrids: skipped where not layered
    ids, cont = torch.randint(0, 97, (1, 16)), torch.randint(0, 97, (1, 30))
    press = QuickMergePress(0.5, window=4, decoding_size=SIZE, decoding_interval=INTERVAL)
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
        for t in range(cont.shape[1]):
            model(cont[:, t : t + 1], **cache_kwargs(model, cache))
        assert press.decoding_merges > 0
        oracle = duplicated_cache(cache)
        nxt = torch.randint(0, 97, (1, 2))
        merged = model(nxt, **cache_kwargs(model, cache)).logits
    with torch.no_grad():
        reference = model(nxt, **cache_kwargs(model, oracle)).logits
    assert torch.allclose(merged, reference, atol=1e-5), (merged - reference).abs().max()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_decoding_is_the_plain_press_s_until_the_first_merge_and_differs_after(attn):
    model = tiny("llama", attn)
    ids, cont = torch.randint(0, 97, (1, 24)), torch.randint(0, 97, (1, 30))
    plain, _ = _decode(model, QuickMergePress(0.5, window=4), ids, cont)
    merging, _ = _decode(model, QuickMergePress(0.5, window=4, decoding_size=SIZE, decoding_interval=INTERVAL),
                         ids, cont)
    first = SIZE + INTERVAL - 12  # the call that filled the cache to SIZE + INTERVAL, then merged
    assert torch.equal(merging[:, : first], plain[:, : first])
    assert not torch.allclose(merging[:, first:], plain[:, first:], atol=1e-3)
    # a size the generation never reaches merges nothing
    never, _ = _decode(model, QuickMergePress(0.5, window=4, decoding_size=64, decoding_interval=8), ids, cont)
    assert torch.equal(never, plain)


def test_batch_rows_merge_independently():
    model = tiny("qwen3", "sdpa")
    ids, cont = torch.randint(0, 97, (2, 20)), torch.randint(0, 97, (2, 30))
    press = QuickMergePress(0.5, window=4, decoding_size=SIZE, decoding_interval=INTERVAL)
    both, _ = _decode(model, press, ids, cont)
    for row in range(2):
        alone, _ = _decode(model, press, ids[row : row + 1], cont[row : row + 1])
        assert torch.allclose(both[row : row + 1], alone, atol=1e-5), (both[row : row + 1] - alone).abs().max()


@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("operation", ["reorder_cache", "batch_select_indices", "batch_repeat_interleave"])
def test_reindexing_the_batch_carries_the_buffered_queries_with_their_rows(ratio, operation):
    """Beam search reorders the cache's rows between calls (``reorder_cache``): the queries buffered for the next
    merge must follow their rows. Reindexing inside the buffering window, then decoding on, equals decoding the
    reindexed rows from the start."""
    model = tiny("llama", "sdpa")
    entries = 8  # after the prefill
    ids, cont = torch.randint(0, 97, (2, int(entries / (1 - ratio)))), torch.randint(0, 97, (2, 30))
    index = {"reorder_cache": torch.tensor([1, 0]), "batch_select_indices": torch.tensor([1]),
             "batch_repeat_interleave": torch.tensor([0, 0, 1, 1])}[operation]
    merge_at = SIZE + INTERVAL - entries - 1  # the call that fills the cache to its bound
    at = merge_at - 1  # the last 4 calls before a merge buffer their queries: 2 are buffered before the reindexing
    press = QuickMergePress(ratio, window=4, decoding_size=SIZE, decoding_interval=INTERVAL)
    cache, logits = transformers.DynamicCache(), []
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
        for t in range(cont.shape[1]):
            if t == at:
                getattr(cache, operation)(2 if operation == "batch_repeat_interleave" else index)
                assert all(layer.decoded_queries.shape[0] == len(index) for layer in cache.layers)
            rows = cont[:, t : t + 1] if t < at else cont[index, t : t + 1]
            logits.append(model(rows, **cache_kwargs(model, cache)).logits)
    assert press.decoding_merges >= 4
    fresh, _ = _decode(model, press, ids[index], cont[index])
    assert torch.allclose(torch.cat(logits[at:], 1), fresh[:, at:], atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "qwen3.5"])
def test_beam_search_inside_the_press_scores_each_beam_as_its_own_decoding(kind):
    """``generate(num_beams=4)`` reorders the cache's rows at every step. The best beam's score is the sum of its
    tokens' log-probabilities given its own history: decoding that sequence alone inside the press (one row, never
    reordered, merged at the same calls) must give the same sum. Gemma 3: sliding layers beside the merged ones;
    Qwen 3.5: linear-attention states beside them (transformers 5.5 or later)."""
    from tests.text.test_hybrid import CLASSES, _hybrid

    model = _hybrid(kind) if kind in CLASSES else tiny(kind, "sdpa")
    ids = torch.randint(0, 97, (1, 16))
    press = QuickMergePress(0.5, window=4, decoding_size=SIZE, decoding_interval=INTERVAL)
    new = 30
    with torch.no_grad(), press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             num_beams=4, do_sample=False, length_penalty=0.0, early_stopping=True,
                             output_scores=True, return_dict_in_generate=True)
    assert press.decoding_merges > 0
    sequence = out.sequences[:1]
    logits, _ = _decode(model, press, ids, sequence[:, 16:-1], configured=True)
    first = torch.log_softmax(model(ids).logits[:, -1:].float(), -1)  # the prefill's prediction (no merge yet)
    steps = torch.cat([first, torch.log_softmax(logits.float(), -1)], 1)
    alone = steps.gather(-1, sequence[:, 16:, None]).sum()
    assert torch.allclose(out.sequences_scores[0], alone, atol=1e-4), (out.sequences_scores[0], alone)


def test_generate_inside_the_press_merges_and_equals_a_greedy_loop():
    model = tiny("gemma3")
    ids = torch.randint(0, 97, (2, 16))
    press = QuickMergePress(0.5, window=4, decoding_size=SIZE, decoding_interval=INTERVAL)
    with press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
        merges = press.decoding_merges
        tokens, cache = greedy_loop(model, ids, 30)
    assert merges > 0 and press.decoding_merges == merges
    assert torch.equal(out, tokens)
    assert all(physical_length(layer) < SIZE + INTERVAL for layer in _full_layers(cache))


def test_several_tokens_per_call_merge_once_the_bound_is_passed():
    """A call of several tokens may carry the cache past the bound: it is merged back after that call."""
    model = tiny("llama", "sdpa")
    ids, cont = torch.randint(0, 97, (1, 20)), torch.randint(0, 97, (1, 15))
    press = QuickMergePress(0.5, window=4, decoding_size=SIZE, decoding_interval=INTERVAL)
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
        model(cont, **cache_kwargs(model, cache))
        assert press.decoding_merges == 2
        assert [physical_length(layer) for layer in cache.layers] == [SIZE, SIZE]
        assert cache.get_seq_length() == 35
        oracle = duplicated_cache(cache)
        nxt = torch.randint(0, 97, (1, 2))
        merged = model(nxt, **cache_kwargs(model, cache)).logits
    with torch.no_grad():
        reference = model(nxt, **cache_kwargs(model, oracle)).logits
    assert torch.allclose(merged, reference, atol=1e-5)


def test_a_new_prompt_starts_without_decoded_queries():
    """A second prompt in the same ``with`` block decodes as with a fresh press: no queries or merge counts carried
    over from the first (whose last call left a query buffered for its next merge). The second prompt fills the
    cache to its bound, so its first decoded token merges at once, scored by that token's query alone."""
    model = tiny("llama", "sdpa")
    ids, cont = torch.randint(0, 97, (1, 20)), torch.randint(0, 97, (1, 25))
    other, other_cont = torch.randint(0, 97, (1, 16)), torch.randint(0, 97, (1, 17))
    press = QuickMergePress(0.0, window=4, decoding_size=SIZE, decoding_interval=INTERVAL)
    with torch.no_grad(), press(model):
        for prompt, tokens in ((other, other_cont), (ids, cont)):
            cache, logits = transformers.DynamicCache(), []
            model(prompt, **cache_kwargs(model, cache))
            logits = torch.cat([model(tokens[:, t : t + 1], **cache_kwargs(model, cache)).logits
                                for t in range(tokens.shape[1])], 1)
    fresh, _ = _decode(model, QuickMergePress(0.0, window=4, decoding_size=SIZE, decoding_interval=INTERVAL), ids,
                       cont)
    assert torch.equal(logits, fresh)
    assert press.decoding_merges == 4 * 2  # this prompt's merges (steps 0, 8, 16, 24) of both layers


def test_each_merge_is_scored_by_the_last_decoding_window_decoded_queries(monkeypatch):
    """``decoding_window`` (not the prompt's ``window``) sets how many decoded queries each merge reads; by default
    a third of ``decoding_size``."""
    import quickmerge.text.quickmerge_press as module

    seen = []

    def spy(*args, **kwargs):
        seen.append(args[4].shape[2])  # queries [B, H, w, d]
        return remerge(*args, **kwargs)

    monkeypatch.setattr(module, "remerge", spy)
    model = tiny("llama", "sdpa")
    ids, cont = torch.randint(0, 97, (1, 16)), torch.randint(0, 97, (1, 30))
    for options, expected in ((dict(decoding_window=3), 3), (dict(decoding_window=6, window=2), 6),
                              (dict(window=2), SIZE // 3), (dict(decoding_size=15, window=9), 5)):
        seen.clear()
        press = QuickMergePress(0.5, **{"decoding_size": SIZE, "decoding_interval": INTERVAL, **options})
        assert press.effective_decoding_window == expected
        _decode(model, press, ids, cont)
        assert seen and seen == [expected] * len(seen), options


def test_the_default_decoding_window_is_a_third_of_the_budget():
    assert QuickMergePress(0.0, decoding_size=192).effective_decoding_window == 64
    assert QuickMergePress(0.0, decoding_size=385).effective_decoding_window == 128
    assert QuickMergePress(0.0, decoding_size=2).effective_decoding_window == 1  # never an empty window
    assert QuickMergePress(0.0, decoding_size=192, decoding_window=16).effective_decoding_window == 16


# ---- the merge itself -----------------------------------------------------------------------------


class _Attention(torch.nn.Module):
    scaling = 1.0


def test_remerge_weights_members_by_mass_times_size_and_adds_sizes():
    """Four entries of one KV head, one query (the last entry's), three kept: the query pays entry 0 the most and
    entry 1 the least, so entries 0, 2, 3 seed and entry 1 (closest to 0) joins entry 0, weighted by its merge mass
    times the tokens it stands for."""
    keys = torch.tensor([[[[4.0, 0.0], [0.3, 0.04], [0.0, 3.0], [-1.0, -1.0]]]])  # [1, 1, 4, 2]; 1 is a short 0
    values = torch.arange(8.0).view(1, 1, 4, 2)
    sizes = torch.tensor([[[2.0, 5.0, 1.0, 1.0]]])
    query = torch.tensor([[[[1.0, 0.2]]]])  # [1, 1, 1, 2]
    module = _Attention()
    k, v, s = remerge(module, keys, values, sizes, query, 3, log_sizes=None, epsilon=0.03, salient="low_entropy",
                      kernel_size=1)
    probs = attention_probs(module, query @ keys.transpose(-1, -2), torch.ones(1, 4, dtype=torch.bool))
    ranks = saliency(Window(query, probs, 1.0), 1, kernel_size=1)[0, 0]
    assert ranks[0] > ranks[2] > ranks[1]  # the premise: entry 1 is the one merged away
    w0, w1 = ranks[0] * 2.0, 0.03 * 5.0
    assert torch.allclose(k[0, 0, 0], (w0 * keys[0, 0, 0] + w1 * keys[0, 0, 1]) / (w0 + w1))
    assert torch.allclose(v[0, 0, 0], (w0 * values[0, 0, 0] + w1 * values[0, 0, 1]) / (w0 + w1))
    assert torch.equal(k[0, 0, 1:], keys[0, 0, 2:]) and torch.equal(v[0, 0, 1:], values[0, 0, 2:])
    assert s.tolist() == [[[7.0, 1.0, 1.0]]]


def test_remerge_scores_with_the_bias_the_queries_attended_with():
    """A large entry (size bias) draws the query's attention: with the bias it seeds, without it it is merged."""
    keys = torch.tensor([[[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.5, 0.5]]]])
    values, sizes = torch.zeros(1, 1, 4, 2), torch.tensor([[[1.0, 1.0, 1.0, 1.0]]])
    query = torch.tensor([[[[2.0, 0.0]]]])
    bias = torch.tensor([[[[0.0, 0.0, 5.0, 0.0]]]])  # entry 2 stands for e^5 tokens
    out = {}
    for name, log_sizes in (("plain", None), ("bias", bias)):
        out[name] = remerge(_Attention(), keys, values, sizes, query, 3, log_sizes=log_sizes, epsilon=0.03,
                            salient="uniform", kernel_size=1)[0]
    assert torch.equal(out["bias"][0, 0, 1], keys[0, 0, 2])  # entry 2 seeds its own group
    assert not (out["plain"][0, 0] == keys[0, 0, 2]).all(-1).any()  # merged into another seed


def test_entry_sizes_reads_the_bias_per_kv_head_and_counts_new_entries_as_one():
    log_sizes = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).log().view(1, 2, 1, 3).repeat_interleave(2, dim=1)
    sizes = entry_sizes(log_sizes, 2, 5, torch.zeros(1))
    assert torch.allclose(sizes, torch.tensor([[[1.0, 2, 3, 1, 1], [4, 5, 6, 1, 1]]]))
    assert torch.equal(entry_sizes(None, 2, 3, torch.zeros(1)), torch.ones(1, 2, 3))


# ---- refusals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(decoding_size=0), "decoding_size"),
    (dict(decoding_size=8, decoding_interval=0), "decoding_interval"),
    (dict(decoding_size=8, decoding_window=0), "decoding_window"),
    (dict(decoding_size=8, decoding_window=8), r"decoding_window .* must be below decoding_size \(8\), got 8"),
    (dict(decoding_window=4), "it needs decoding_size"),
    (dict(decoding_size=8, proportional=False), "proportional=True"),
    (dict(decoding_size=8, bias="mass"), "bias='size'"),
    (dict(decoding_size=8, scoring="replay", budget="replay", head_budgets=True), "head_budgets=False"),
])
def test_options_it_cannot_work_with_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuickMergePress(0.5, **kwargs)


@pytest.mark.parametrize("kind,match", [("gemma3n", "read the cache of an earlier layer"),
                                        ("deepseek-v3", "latent")])
def test_models_it_cannot_merge_while_decoding_are_refused_on_entry(kind, match):
    if too_old(kind):
        pytest.skip(f"{kind} needs a later transformers")
    model = tiny(kind, "sdpa", layers=6 if kind == "gemma3n" else 2)
    with pytest.raises(UnsupportedAttentionError, match=match), QuickMergePress(0.5, decoding_size=8)(model):
        pass
    with QuickMergePress(0.5)(model):  # the same press without decoding_size is entered
        pass
