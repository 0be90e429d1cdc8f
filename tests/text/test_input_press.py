"""QuickMergeInputPress on tiny random-weight causal LMs: exactness, a hand-run reference with sliding
windows, several prompts per press, and refusals."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import QuickMergeInputPress  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from tests.text.tiny import greedy_loop, tiny  # noqa: E402

MODELS = [(k, a) for k in ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "gemma3", "gemma3-vlm")
          for a in ("eager", "sdpa")]


def _run(model, press, ids, cont, cache=None, inside=True):
    cache = transformers.DynamicCache() if cache is None else cache
    with torch.no_grad():
        with press(model):
            model(ids, **cache_kwargs(model, cache))
            if inside:
                return model(cont, **cache_kwargs(model, cache)).logits, cache
        return model(cont, **cache_kwargs(model, cache)).logits, cache


@pytest.mark.parametrize("kind,attn", MODELS)
def test_ratio_zero_is_exact_and_merging_shrinks_the_upper_layers(kind, attn):
    model = tiny(kind, attn, layers=3)
    ids, cont = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 30:]
    logits, _ = _run(model, QuickMergeInputPress(0.0, layer=0), ids, cont)
    assert torch.allclose(logits, reference, atol=1e-5)
    press = QuickMergeInputPress(0.5, layer=0, window=4)
    logits, cache = _run(model, press, ids, cont)
    assert [layer.keys.shape[2] for layer in cache.layers] == [36, 21, 21]
    assert press.achieved_ratio == pytest.approx(0.5) and torch.isfinite(logits).all()
    with torch.no_grad():
        assert torch.equal(model(torch.cat([ids, cont], 1)).logits[:, 30:], reference)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---- a reference run by hand ---------------------------------------------------------------------------


def _window(model, i):
    attn = model.model.layers[i].self_attn
    window = getattr(attn, "sliding_window", model.config.sliding_window if hasattr(model.config, "sliding_window")
                     and not hasattr(attn, "sliding_window") else None)
    return window


def _brute_mask(q_pos, k_pos, window):
    mask = torch.full((len(q_pos), len(k_pos)), float("-inf"))
    for a, p in enumerate(q_pos):
        for b, k in enumerate(k_pos):
            if k <= p and (window is None or p - k < window):
                mask[a, b] = 0.0
    return mask[None, None]


def _rope(model, i, h, positions):
    rotary = model.model.rotary_emb
    if isinstance(model, transformers.Gemma3ForCausalLM):
        return rotary(h, positions[None], model.config.layer_types[i])
    return rotary(h, positions[None])


@torch.no_grad()
def _by_hand(model, ids, merged, merged_pos, layer, cont, windows=True):
    """Layers called one by one; every mask built from positions by brute force; the merged prompt
    (taken from the press) enters layer+1 at its positions. Returns the normed states of ``cont``."""
    n, layers = ids.shape[1], model.model.layers
    cache = transformers.DynamicCache()
    kv_pos = {}
    h, pos = model.model.embed_tokens(ids), torch.arange(n)
    for i, block in enumerate(layers):
        if i == layer + 1:
            h, pos = merged, merged_pos
        kv_pos[i] = pos.tolist()
        window = _window(model, i) if windows else None
        h = block(h, attention_mask=_brute_mask(pos.tolist(), kv_pos[i], window), position_ids=pos[None],
                  cache_position=pos, **cache_kwargs(block, cache), use_cache=True,
                  position_embeddings=_rope(model, i, h, pos))
        h = h[0] if isinstance(h, tuple) else h
    new = torch.arange(n, n + cont.shape[1])
    h = model.model.embed_tokens(cont)
    for i, block in enumerate(layers):
        kv_pos[i] += new.tolist()
        window = _window(model, i) if windows else None
        h = block(h, attention_mask=_brute_mask(new.tolist(), kv_pos[i], window), position_ids=new[None],
                  cache_position=new, **cache_kwargs(block, cache), use_cache=True,
                  position_embeddings=_rope(model, i, h, new))
        h = h[0] if isinstance(h, tuple) else h
    return model.model.norm(h)


@pytest.mark.parametrize("kind,time_period", [("llama", None), ("mistral", None), ("gemma3", None), ("llama", 13),
                                              ("mistral", 13), ("ministral3", None)])
@pytest.mark.parametrize("with_config", [True, False], ids=["cache-with-config", "plain-cache"])
def test_prefill_and_decoding_equal_a_reference_run_by_hand(kind, time_period, with_config):
    """Upper layers see the merged prompt at its positions, causally and within their sliding windows
    (``time_period``: spans along time, the merged prompt still ordered by position); Ministral 3 scales its
    queries by those positions (past position 8 in the tiny model)."""
    model = tiny(kind, "sdpa", layers=3, sliding_window=8 if kind != "llama" else None)
    ids, cont = torch.randint(0, 97, (1, 40)), torch.randint(0, 97, (1, 5))
    press = QuickMergeInputPress(0.5, layer=0, window=4, time_period=time_period, time_offset=1)
    captured = {}

    def capture(_m, _a, _k, out):
        captured["merged"] = (out[0] if isinstance(out, tuple) else out).clone()
        captured["positions"] = press._positions[0].clone()

    cache = transformers.DynamicCache(config=model.config) if with_config else transformers.DynamicCache()
    with torch.no_grad(), press(model):
        handle = model.model.layers[0].register_forward_hook(capture, with_kwargs=True)
        model.model(ids, **cache_kwargs(model, cache))
        handle.remove()
        ours = model.model(cont, **cache_kwargs(model, cache)).last_hidden_state
    reference = _by_hand(model, ids, captured["merged"], captured["positions"], 0, cont)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    assert (captured["positions"].diff() > 0).all() and int(captured["positions"][-1]) == 39
    if kind in ("mistral", "gemma3"):  # the windows matter here: full causal masks would give other states
        full = _by_hand(model, ids, captured["merged"], captured["positions"], 0, cont, windows=False)
        assert not torch.allclose(full, reference, atol=1e-4)


def test_a_second_prompt_behaves_like_a_fresh_press():
    model = tiny("gemma3", layers=3)
    first, second, cont = torch.randint(0, 97, (1, 40)), torch.randint(0, 97, (1, 26)), torch.randint(0, 97, (1, 4))
    press = QuickMergeInputPress(0.5, layer=0)
    with torch.no_grad(), press(model):
        model(first, **cache_kwargs(model, transformers.DynamicCache()))
        cache = transformers.DynamicCache()
        model(second, **cache_kwargs(model, cache))
        reused = model(cont, **cache_kwargs(model, cache)).logits
    fresh, _ = _run(model, QuickMergeInputPress(0.5, layer=0), second, cont)
    assert torch.equal(reused, fresh) and press.original_length == 26


def test_generate_inside_equals_a_greedy_loop_and_outside_refuses_several_tokens():
    model = tiny("mistral", layers=3, sliding_window=8)
    ids = torch.randint(0, 97, (1, 30))
    press = QuickMergeInputPress(0.5, layer=0)
    with press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
        tokens, cache = greedy_loop(model, ids, 5)
    assert torch.equal(out, tokens)
    for tokens in (3, 1):  # sliding upper layers need the press's masks even for one token
        with torch.no_grad(), pytest.raises(RuntimeError, match="decode inside `with press"):
            model(torch.randint(0, 97, (1, tokens)), **cache_kwargs(model, cache))


def test_one_token_at_a_time_outside_works_on_full_attention_layers():
    model = tiny("llama", layers=3)
    ids, cont = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 1))
    inside, _ = _run(model, QuickMergeInputPress(0.5, layer=0), ids, cont)
    outside, cache = _run(model, QuickMergeInputPress(0.5, layer=0), ids, cont, inside=False)
    assert torch.allclose(inside, outside, atol=1e-5)
    with torch.no_grad(), pytest.raises(RuntimeError, match="QuickMergeInputPress"):
        model(torch.randint(0, 97, (1, 2)), **cache_kwargs(model, cache))


def test_errors():
    with pytest.raises(ValueError, match="layer"):
        QuickMergeInputPress(layer=-2)
    with pytest.raises(ValueError, match="below the last decoder layer"), QuickMergeInputPress(layer=1)(tiny("llama")):
        pass
    model = tiny("llama", layers=3)
    ids = torch.randint(0, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded"), QuickMergeInputPress(0.5, layer=0)(model):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_a_vision_language_model_with_an_image_is_exact_at_ratio_zero_and_refuses_padding():
    """Gemma3ForConditionalGeneration: the decoder's input is the text embeddings with the image features in
    place, its masks a prepared dict; the press merges them like any prompt."""
    from tests.text.test_kv_press import _image_prompt

    model = tiny("gemma3-vlm", layers=3)
    ids, types, pixels = _image_prompt()
    cont = torch.randint(1, 90, (2, 4))
    with torch.no_grad():
        whole = dict(pixel_values=pixels, token_type_ids=torch.cat([types, torch.zeros_like(cont)], 1))
        reference = model(torch.cat([ids, cont], 1), **whole).logits[:, -4:]
        for ratio, kept in ((0.0, [40, 40, 40]), (0.5, [40, 22, 22])):
            cache, press = transformers.DynamicCache(), QuickMergeInputPress(ratio, layer=0)
            with press(model):
                model(ids, pixel_values=pixels, token_type_ids=types, **cache_kwargs(model, cache))
                logits = model(cont, **cache_kwargs(model, cache)).logits
            assert [layer.keys.shape[2] for layer in cache.layers] == kept
            assert torch.allclose(logits, reference, atol=1e-5) == (ratio == 0.0)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded"), QuickMergeInputPress(0.5, layer=0)(model):
        model.generate(ids, attention_mask=mask, pixel_values=pixels, token_type_ids=types, max_new_tokens=2,
                       do_sample=False)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_merged_image_tokens_still_attend_to_their_whole_image(attn):
    """Gemma 3's image tokens attend to every token of their image (its own masks say so); above the merge, a
    merged token attends where the token at its position did: both ways inside the image, causally elsewhere
    (brute force over positions)."""
    from quickmerge.text.decoder import decoder_layers
    from tests.text.test_kv_press import _image_prompt

    model = tiny("gemma3-vlm", attn, layers=3)
    ids, types, pixels = _image_prompt()  # image tokens at positions 6..9
    press, seen = QuickMergeInputPress(0.16, layer=0), {}  # 36 -> 30 tokens
    # the tiny tower's image tokens are alike and merge first; fix the spans so that they stay apart
    # (text positions 0..3 and 19..22 merged), to see the masks of every kind of pair
    groups = torch.tensor([0, 0, 0, *range(17), 16, 16, 16, *range(17, 30)])
    press._spans = lambda hidden, saliency, kept: groups.expand(hidden.shape[0], -1)

    def capture(module, args, kwargs):
        seen["mask"], seen["positions"] = kwargs["attention_mask"], press._positions.clone()

    with torch.no_grad(), press(model):
        handle = decoder_layers(model)[1].register_forward_pre_hook(capture, with_kwargs=True)  # a global layer
        model(ids, pixel_values=pixels, token_type_ids=types, **cache_kwargs(model, transformers.DynamicCache()))
        handle.remove()
    ahead = 0
    for row in range(ids.shape[0]):
        pos = seen["positions"][row]
        image = types[row].bool()[pos]  # merged tokens whose position holds an image token
        want = (pos[None, :] <= pos[:, None]) | (image[:, None] & image[None, :])
        assert torch.equal(seen["mask"][row, 0] == 0, want)
        ahead += int((want & (pos[None, :] > pos[:, None])).sum())
    assert ahead > 0  # some merged image token attends to a later one


def _two_image_prompt():
    """Two rows of text with two images each (begin 94, four image tokens 96, end 95) for ``tiny("gemma3-vlm")``."""
    g = torch.Generator().manual_seed(3)
    text = torch.randint(1, 90, (2, 25), generator=g)
    image = torch.tensor([[94, 96, 96, 96, 96, 95]] * 2)
    ids = torch.cat([text[:, :5], image, text[:, 5:15], image, text[:, 15:]], 1)
    return ids, (ids == 96).long(), torch.randn(4, 3, 32, 32, generator=g)


@pytest.mark.parametrize("layer", [-1, 0])
@pytest.mark.parametrize("ratio,image_kept", [(0.0, 8), (0.5, 4), (0.9, 2)])
def test_token_ids_merge_only_those_tokens_and_each_run_apart(layer, ratio, image_kept):
    """token_ids=(image token,): text tokens pass whole at their positions; each merged token is the mean of a
    run of one image's tokens (layer -1: of their embeddings); the ratio applies to the image tokens, each image
    keeping at least one; ratio 0 is exact."""
    from quickmerge.text.decoder import base_model, decoder_layers

    model = tiny("gemma3-vlm", layers=3)
    ids, types, pixels = _two_image_prompt()
    n, image = ids.shape[1], types.bool()
    with torch.no_grad():
        reference = model(ids, pixel_values=pixels, token_type_ids=types).logits
    press, seen = QuickMergeInputPress(ratio, layer=layer, token_ids=(96,)), {}

    def before(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    def merged(module, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["positions"] = None if press._positions is None else press._positions.clone()

    with torch.no_grad(), press(model):
        handles = [base_model(model).register_forward_pre_hook(before, with_kwargs=True),
                   decoder_layers(model)[layer + 1].register_forward_pre_hook(merged, with_kwargs=True)]
        logits = model(ids, pixel_values=pixels, token_type_ids=types).logits
        for handle in handles:
            handle.remove()
    kept = n - 8 + image_kept
    assert press.achieved_ratio == pytest.approx((n - kept) / n)
    if ratio == 0.0:
        assert seen["positions"] is None and torch.allclose(logits, reference, atol=1e-5)
        return
    for row in range(2):
        pos = seen["positions"][row]
        assert pos.shape == (kept,) and int(image[row, pos].sum()) == image_kept
        assert set(range(n)) - set(pos.tolist()) <= set(image[row].nonzero().flatten().tolist())  # text all kept
        starts = torch.cat([pos.new_zeros(1), pos[:-1] + 1])
        for k, (first, last) in enumerate(zip(starts.tolist(), pos.tolist(), strict=True)):
            if not image[row, last]:
                assert first == last  # a text token alone
                if layer == -1:
                    assert torch.equal(seen["hidden"][row, k], seen["embeds"][row, last])
                continue
            assert bool(image[row, first : last + 1].all())  # one run of one image's tokens
            if layer == -1:
                want = seen["embeds"][row, first : last + 1].mean(0)
                assert torch.allclose(seen["hidden"][row, k], want, atol=1e-5)


def test_token_ids_errors():
    with pytest.raises(ValueError, match="token_ids"):
        QuickMergeInputPress(token_ids=())
    with pytest.raises(ValueError, match="token_ids"):
        QuickMergeInputPress(token_ids=(True,))
    with pytest.raises(ValueError, match="time_period"):
        QuickMergeInputPress(token_ids=(5,), time_period=4)
    model = tiny("llama", layers=3)
    ids = torch.randint(1, 97, (2, 20))
    ids[:, 5:9] = 7
    ids[1, 12] = 7  # one more in the second row
    ran = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=r"same number of those tokens in every row of the batch; got \[4, 5\]"), \
            torch.no_grad(), QuickMergeInputPress(0.5, layer=0, token_ids=(7,))(model):
        model(ids)
    with pytest.raises(ValueError, match="reads the prompt's input_ids"), torch.no_grad(), \
            QuickMergeInputPress(0.5, layer=0, token_ids=(7,))(model):
        model(inputs_embeds=model.model.embed_tokens(ids))
    handle.remove()
    assert not ran  # refused before any layer ran


def test_time_spans_keep_one_location_per_group():
    press = QuickMergeInputPress(0.5, layer=0, time_period=5, time_offset=1)
    hidden = torch.randn(2, 1 + 4 * 5, 8)
    groups = press._spans(hidden, torch.rand(2, 21), 10)
    location = torch.cat([torch.tensor([-1]), torch.arange(20) % 5])
    for b in range(2):
        assert sorted(groups[b].unique().tolist()) == list(range(10))
        for g in range(10):
            assert location[groups[b] == g].unique().numel() == 1
    with pytest.raises(ValueError, match="time_period"):
        QuickMergeInputPress(0.5, time_period=0)


@pytest.mark.parametrize("time_period", [None, 13])
def test_merging_the_embeddings_before_the_first_layer_equals_a_reference_run_by_hand(time_period):
    """layer=-1: every layer runs on the merged embeddings at their positions."""
    model = tiny("llama", "sdpa", layers=3)
    ids = torch.randint(0, 97, (1, 40))
    ids[0, 14:27] = ids[0, 1:14]  # a repeated "frame": identical embeddings merge first
    cont = torch.randint(0, 97, (1, 5))
    press = QuickMergeInputPress(0.25, layer=-1, time_period=time_period, time_offset=1)
    captured = {}

    def capture(_m, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if "merged" not in captured:
            captured["merged"], captured["positions"] = hidden.clone(), press._positions[0].clone()

    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        handle = model.model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        model.model(ids, **cache_kwargs(model, cache))
        handle.remove()
        ours = model.model(cont, **cache_kwargs(model, cache)).last_hidden_state
    assert captured["merged"].shape[1] == 30 and [layer.keys.shape[2] for layer in cache.layers] == [35, 35, 35]
    reference = _by_hand(model, ids, captured["merged"], captured["positions"], -1, cont)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    if time_period is not None:  # the repeated frame merged into the first, location by location
        assert (captured["positions"] >= 27).sum() == 13 and captured["positions"].tolist()[:1] == [0]
    logits, _ = _run(model, QuickMergeInputPress(0.0, layer=-1), ids, cont)
    with torch.no_grad():
        assert torch.allclose(logits, model(torch.cat([ids, cont], 1)).logits[:, 40:], atol=1e-5)


def test_a_prefill_it_could_not_merge_raises(monkeypatch):
    """Hidden states around the merge layer in a layout the press does not read (here: read as if batch and tokens
    were swapped) leave the prompt unmerged: the prefill raises instead of running uncompressed in silence."""
    from quickmerge.text import input_press

    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 20))
    with pytest.raises(RuntimeError, match="merged nothing in a prefill of 20 tokens"), torch.no_grad(), \
            QuickMergeInputPress(0.5, layer=0)(model):
        monkeypatch.setattr(input_press, "as_tokens", lambda hidden: hidden.transpose(0, 1))
        model(ids, **cache_kwargs(model, transformers.DynamicCache()))
    with torch.no_grad(), QuickMergeInputPress(0.0, layer=0)(model):  # nothing to merge: nothing to miss
        model(ids, **cache_kwargs(model, transformers.DynamicCache()))
