"""The KV presses on tiny random-weight causal LMs: exactness, restoration, shapes, positions and masks
against independent references, several prompts per press, and loud refusals."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import (  # noqa: E402
    SUPPORTED_ARCHITECTURES,
    QuickMergeInputPress,
    QuickMergePress,
    RandomEvictionPress,
    ToMeKVPress,
)
from quickmerge.text.cache import UnsupportedCacheError, cache_kwargs, own_cache_class  # noqa: E402
from quickmerge.text.decoder import base_model  # noqa: E402
from tests.text.tiny import (  # noqa: E402
    COMMON,
    HYBRID_KINDS,
    KINDS,
    MORE_KINDS,
    MROPE_KINDS,
    NEWER,
    OWN_TEST_KINDS,
    duplicated_cache,
    greedy_loop,
    one_at_a_time,
    tiny,
    too_old,
)
from tests.text.tiny_vlm import KINDS as VISION_LANGUAGE_KINDS  # noqa: E402
from tests.text.tiny_vlm import vision_language  # noqa: E402


def _tiny(kind: str, attn: str):
    return tiny(kind, attn)


MODELS = [(k, a) for k in ("llama", "mistral", "qwen2", "qwen3", "phi3") for a in ("eager", "sdpa")]


def _prefill_then_score(model, press, ids, cont, inside=True):
    cache = transformers.DynamicCache()
    positions = torch.arange(ids.shape[1], ids.shape[1] + cont.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        if press is None:
            model(ids, **cache_kwargs(model, cache))
            return model(cont, **cache_kwargs(model, cache), position_ids=positions).logits, cache
        with press(model):
            model(ids, **cache_kwargs(model, cache))
            if inside:
                return model(cont, **cache_kwargs(model, cache), position_ids=positions).logits, cache
        return model(cont, **cache_kwargs(model, cache), position_ids=positions).logits, cache


@pytest.mark.parametrize("kind,attn", MODELS)
def test_ratio_zero_reproduces_the_unpatched_model_and_exit_restores_it(kind, attn):
    model = _tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 30:]
    logits, cache = _prefill_then_score(model, QuickMergePress(compression_ratio=0.0), ids, cont)
    assert cache.get_seq_length() == 36
    assert torch.allclose(logits, reference, atol=1e-5)
    press = QuickMergePress(compression_ratio=0.5, window=4)
    _prefill_then_score(model, press, ids, cont)
    with torch.no_grad():
        after = model(torch.cat([ids, cont], 1)).logits[:, 30:]
    assert torch.equal(after, reference)  # hooks and per-layer state are gone
    assert all(not hasattr(layer.self_attn, "_quickmerge_bias") for layer in model.model.layers)


@pytest.mark.parametrize("kind,attn", MODELS)
@pytest.mark.parametrize("press_cls", [QuickMergePress, ToMeKVPress, RandomEvictionPress])
def test_compression_keeps_the_requested_share(kind, attn, press_cls):
    model = _tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 5))
    press = press_cls(compression_ratio=0.5, **({"window": 8} if press_cls is QuickMergePress else {}))
    logits, cache = _prefill_then_score(model, press, ids, cont)
    assert press.original_length == 40 and press.compressed_length == 20
    assert press.achieved_ratio == pytest.approx(0.5)
    assert [layer.keys.shape[2] for layer in cache.layers] == [20 + 5] * 2  # entries held
    assert cache.get_seq_length() == 40 + 5  # positions seen: new tokens continue from the prompt
    assert logits.shape == (2, 5, 97) and torch.isfinite(logits).all()


def test_proportional_attention_changes_decoding_and_positions_continue():
    model = _tiny("llama", "sdpa")
    ids, cont = torch.randint(0, 97, (1, 40)), torch.randint(0, 97, (1, 5))
    with_bias, _ = _prefill_then_score(model, QuickMergePress(0.5, window=4), ids, cont)
    without, _ = _prefill_then_score(model, QuickMergePress(0.5, window=4, proportional=False), ids, cont)
    assert not torch.allclose(with_bias, without)
    # Inside the context, positions of new tokens continue from the original length by themselves.
    press = QuickMergePress(0.5, window=4)
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
        implicit = model(cont, **cache_kwargs(model, cache)).logits
    assert torch.allclose(implicit, with_bias, atol=1e-5)


def test_generate_inside_the_press():
    model = _tiny("llama", "sdpa")
    ids = torch.randint(0, 97, (2, 32))
    press = QuickMergePress(0.5, window=4)
    with press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 36) and press.achieved_ratio == pytest.approx(0.5)


def test_errors():
    with pytest.raises(ValueError, match="compression_ratio"):
        QuickMergePress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="window"):
        QuickMergePress(window=0)
    with pytest.raises(ValueError, match="salient"):
        QuickMergePress(salient="middle")
    with pytest.raises(TypeError, match="no decoder layers"), QuickMergePress()(torch.nn.Linear(2, 2)):
        pass
    model = _tiny("llama", "sdpa")
    ids = torch.randint(0, 97, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded"), QuickMergePress(0.5, window=4)(model):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="unpadded"), QuickMergePress(0.5, window=4)(model):
        model.model(ids, attention_mask=mask)  # the decoder stack called alone is checked too


def test_every_supported_architecture_is_built_by_the_tests():
    """The list users read is the list the tests run: each class has a tiny model here, and none warns."""
    import warnings

    built = {}
    for kind in KINDS + MORE_KINDS + MROPE_KINDS + HYBRID_KINDS + OWN_TEST_KINDS:
        if kind in ("qwen3.5", "qwen3.5-moe", "qwen3.5-vl") and not hasattr(transformers, "Qwen3_5ForCausalLM"):
            continue  # transformers 5.2 added them
        if too_old(kind):
            continue
        model = tiny(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            if kind in HYBRID_KINDS and own_cache_class(base_model(model)):  # refused as patched, the release named
                with pytest.raises(UnsupportedCacheError, match=r"5\.5 or later"), QuickMergePress(0.0)(model):
                    pass
            else:
                with QuickMergePress(0.0)(model):
                    pass
        built[type(model).__name__] = kind
    for kind in VISION_LANGUAGE_KINDS:  # tests/text/test_vision_language.py
        model = vision_language(kind).model
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with QuickMergePress(0.0)(model):
                pass
        built[type(model).__name__] = kind
    too_new = {NEWER[kind][0] for kind in NEWER if too_old(kind)}
    assert {name for name in SUPPORTED_ARCHITECTURES if hasattr(transformers, name)} - too_new == set(built)


def _image_prompt(batch: int = 2):
    """Token ids with one image (begin 94, four image tokens 96, end 95) amid text, their token types and
    the tiny SigLIP tower's pixels, for ``tiny("gemma3-vlm")``."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 90, (batch, 30), generator=g)  # 0 is the pad token
    ids = torch.cat([text[:, :5], torch.tensor([[94, 96, 96, 96, 96, 95]] * batch), text[:, 5:]], 1)
    return ids, (ids == 96).long(), torch.randn(batch, 3, 32, 32, generator=g)


def test_a_vision_language_model_merges_its_decoder_cache_with_an_image_in_the_prompt():
    """Gemma3ForConditionalGeneration (a kvpress-supported class): its decoder gets the image features as
    embeddings and a dict of prepared masks; ratio 0 is exact with the image, decoding after merging equals
    the duplicated-cache oracle, generate runs inside, and padding in the caller's mask is still refused."""
    model = tiny("gemma3-vlm")
    ids, types, pixels = _image_prompt()
    cont = torch.randint(1, 90, (2, 4))
    with torch.no_grad():
        whole = dict(pixel_values=pixels, token_type_ids=torch.cat([types, torch.zeros_like(cont)], 1))
        reference = model(torch.cat([ids, cont], 1), **whole).logits[:, -4:]
        assert not torch.allclose(reference, model(torch.cat([ids, cont], 1)).logits[:, -4:], atol=1e-3)
        cache = transformers.DynamicCache()
        with QuickMergePress(0.0)(model):
            model(ids, pixel_values=pixels, token_type_ids=types, **cache_kwargs(model, cache))
            assert torch.allclose(model(cont, **cache_kwargs(model, cache)).logits, reference, atol=1e-5)
        press, cache = QuickMergePress(0.5), transformers.DynamicCache()
        with press(model):
            model(ids, pixel_values=pixels, token_type_ids=types, **cache_kwargs(model, cache))
            oracle = duplicated_cache(cache)
            merged = model(cont, **cache_kwargs(model, cache)).logits
            generated = model.generate(ids, pixel_values=pixels, token_type_ids=types, max_new_tokens=3,
                                       do_sample=False)
        assert press.compressed_length == 18 and [layer.keys.shape[2] for layer in cache.layers] == [40, 22, 40]
        assert torch.allclose(merged, model(cont, **cache_kwargs(model, oracle)).logits, atol=1e-5)
        assert generated.shape == (2, 39)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="unpadded"), QuickMergePress(0.5)(model):
        model.generate(ids, attention_mask=mask, pixel_values=pixels, token_type_ids=types, max_new_tokens=2,
                       do_sample=False)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma3_merges_global_layers_and_is_exact_at_ratio_zero(attn):
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3},
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    model = transformers.Gemma3ForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    ids, cont = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 30:]
    logits, _ = _prefill_then_score(model, QuickMergePress(compression_ratio=0.0), ids, cont)
    assert torch.allclose(logits, reference, atol=1e-5)
    press = QuickMergePress(compression_ratio=0.5, window=4)
    logits, cache = _prefill_then_score(model, press, ids, cont)
    assert cache.layers[1].keys.shape[2] == 15 + 6  # the global layer holds the merged prompt + new tokens
    assert press.achieved_ratio == pytest.approx(0.5) and torch.isfinite(logits).all()
    # Without positions, tokens decoded inside the press are placed after the original prompt.
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
        implicit = model(cont, **cache_kwargs(model, cache)).logits
    assert torch.allclose(implicit, logits, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(torch.cat([ids, cont], 1)).logits[:, 30:], reference)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "rows"}, "mode"),
        ({"bias": "none"}, "bias"),
        ({"kernel_size": 0}, "kernel_size"),
        ({"kmeans_iters": -1}, "kmeans_iters"),
        ({"epsilon": 0.0}, "epsilon"),
    ],
)
def test_press_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuickMergePress(**kwargs)


@pytest.mark.parametrize("press_cls", [ToMeKVPress, RandomEvictionPress])
def test_baselines_carry_only_their_own_options(press_cls):
    with pytest.raises(TypeError, match="window"):
        press_cls(compression_ratio=0.5, window=8)
    with pytest.raises(ValueError, match="compression_ratio"):
        press_cls(compression_ratio=1.5)


# ---- positions, masks and proportional attention against independent references -----------------


@pytest.mark.parametrize("kind", ["llama", "qwen3", "mixtral", "qwen3-moe", "phi3", "smollm3", "gemma3", "gemma3-vlm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("press_cls", [QuickMergePress, ToMeKVPress])
def test_decoding_inside_equals_an_unpatched_model_on_the_duplicated_cache(kind, attn, press_cls):
    """Proportional attention = each merged entry repeated size times; positions continue from the prompt."""
    model = tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 32)), torch.randint(0, 97, (2, 5))
    cache = transformers.DynamicCache()
    with torch.no_grad(), press_cls(compression_ratio=0.5)(model):
        model(ids, **cache_kwargs(model, cache))
        reference_cache = duplicated_cache(cache)
        merged = model(cont, **cache_kwargs(model, cache)).logits  # no position_ids: the cache knows them
    with torch.no_grad():
        reference = model(cont, **cache_kwargs(model, reference_cache)).logits
    assert torch.allclose(merged, reference, atol=1e-5), (merged - reference).abs().max()
    # and the oracle is not trivial: without proportional attention the logits differ
    if press_cls is QuickMergePress:
        cache = transformers.DynamicCache()
        with torch.no_grad(), QuickMergePress(0.5, proportional=False)(model):
            model(ids, **cache_kwargs(model, cache))
            plain = model(cont, **cache_kwargs(model, cache)).logits
        assert not torch.allclose(plain, reference, atol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gemma3-vlm"])
@pytest.mark.parametrize("inside", [True, False], ids=["inside", "outside"])
@pytest.mark.parametrize("press_cls", [QuickMergePress, RandomEvictionPress])
def test_several_tokens_in_one_call_equal_one_at_a_time(kind, inside, press_cls):
    """New tokens never see later new tokens, inside or outside the press, whichever layers were shortened
    (Gemma 3: only the global ones)."""
    model = tiny(kind, "sdpa")
    ids, cont = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 6))
    press = press_cls(compression_ratio=0.5)
    results = []
    for at_once in (True, False):
        cache = transformers.DynamicCache()
        with torch.no_grad():
            with press(model):
                model(ids, **cache_kwargs(model, cache))
                if inside:
                    results.append(model(cont, **cache_kwargs(model, cache)).logits if at_once
                                   else one_at_a_time(model, cont, cache))
            if not inside:
                results.append(model(cont, **cache_kwargs(model, cache)).logits if at_once
                               else one_at_a_time(model, cont, cache))
    assert torch.allclose(results[0], results[1], atol=1e-5), (results[0] - results[1]).abs().max()


def test_positions_continue_from_the_prompt_without_the_press():
    model = tiny("llama")
    ids, cont = torch.randint(0, 97, (1, 30)), torch.randint(0, 97, (1, 4))
    cache = transformers.DynamicCache()
    with torch.no_grad():
        with RandomEvictionPress(0.5)(model):
            model(ids, **cache_kwargs(model, cache))
        implicit = model(cont, **cache_kwargs(model, cache)).logits
        cache_copy = cache  # same entries; now with explicit positions
    assert cache.get_seq_length() == 34 and cache.layers[0].keys.shape[2] == 15 + 4
    del cache_copy
    cache = transformers.DynamicCache()
    with torch.no_grad():
        with RandomEvictionPress(0.5)(model):
            model(ids, **cache_kwargs(model, cache))
        explicit = model(cont, **cache_kwargs(model, cache), position_ids=torch.arange(30, 34)[None]).logits
    assert torch.allclose(implicit, explicit, atol=1e-6)


# ---- several prompts in one `with` block -----------------------------------------------------------


@pytest.mark.parametrize("press_cls", [QuickMergePress, ToMeKVPress, RandomEvictionPress])
def test_a_second_prompt_in_the_same_block_behaves_like_a_fresh_press(press_cls):
    model = tiny("llama")
    first, second = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 24))
    cont = torch.randint(0, 97, (2, 5))
    press = press_cls(compression_ratio=0.5)
    with torch.no_grad(), press(model):
        model(first, **cache_kwargs(model, transformers.DynamicCache()))
        model(cont, **cache_kwargs(model, transformers.DynamicCache()))  # a stray call on another cache
        cache = transformers.DynamicCache()
        model(second, **cache_kwargs(model, cache))
        reused = model(cont, **cache_kwargs(model, cache)).logits
        lengths = (press.original_length, press.compressed_length)
    fresh_press = press_cls(compression_ratio=0.5)
    cache = transformers.DynamicCache()
    with torch.no_grad(), fresh_press(model):
        model(second, **cache_kwargs(model, cache))
        fresh = model(cont, **cache_kwargs(model, cache)).logits
    assert torch.equal(reused, fresh) and lengths == (24, 12)


def test_generate_loop_over_prompts_equals_fresh_presses():
    model = tiny("gemma3")
    prompts = [torch.randint(0, 97, (1, n)) for n in (30, 18, 25)]
    press = QuickMergePress(0.5, window=4)
    with press(model):
        looped = [model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=5, do_sample=False)
                  for p in prompts]
    for p, out in zip(prompts, looped, strict=True):
        with QuickMergePress(0.5, window=4)(model):
            fresh = model.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=5, do_sample=False)
        assert torch.equal(out, fresh)


def test_generate_inside_equals_a_greedy_loop_inside():
    model = tiny("gemma3")
    ids = torch.randint(0, 97, (2, 30))
    press = QuickMergePress(0.5, window=4)
    with press(model):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        tokens, _ = greedy_loop(model, ids, 6)
    assert torch.equal(out, tokens)


# ---- refusals ---------------------------------------------------------------------------------------


def test_caches_that_cannot_be_shortened_in_place_raise():
    from quickmerge.text.cache import UnsupportedCacheError

    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 20))
    static = transformers.StaticCache(config=model.config, max_cache_len=64)
    with pytest.raises(UnsupportedCacheError, match="StaticLayer"), QuickMergePress(0.5)(model), torch.no_grad():
        model(ids, **cache_kwargs(model, static))
    offloaded = transformers.DynamicCache()
    offloaded.offloading = True  # DynamicCache(offloading=True) itself needs a GPU
    with pytest.raises(UnsupportedCacheError, match="offload"), QuickMergePress(0.5)(model), torch.no_grad():
        model(ids, **cache_kwargs(model, offloaded))


@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_attention_without_float_masks_refuses_proportional_attention(implementation):
    model = tiny("llama")
    model.config._attn_implementation_internal = implementation  # the check runs before any attention
    with pytest.raises(ValueError, match=implementation), QuickMergePress(0.5)(model), torch.no_grad():
        model(torch.randint(0, 97, (1, 20)), **cache_kwargs(model, transformers.DynamicCache()))


def test_every_layer_sliding_raises_instead_of_compressing_nothing():
    model = tiny("mistral", sliding_window=16)
    with pytest.raises(RuntimeError, match="sliding-window"), QuickMergePress(0.5)(model), torch.no_grad():
        model(torch.randint(0, 97, (1, 30)), **cache_kwargs(model, transformers.DynamicCache()))


@pytest.mark.parametrize("press_cls", [QuickMergePress, ToMeKVPress, RandomEvictionPress])
def test_attention_pairing_values_and_keys_of_different_heads_is_refused(press_cls):
    """DiffLlama's differential attention pairs the values of one KV head with the keys of another; merging each KV
    head its own way would pair entries that stand for different tokens (decoding then departed from the
    duplicated-cache oracle by 8e-2): refused as the press is entered, the layers named."""
    from quickmerge.text.decoder import UnsupportedAttentionError

    model = transformers.DiffLlamaForCausalLM(transformers.DiffLlamaConfig(**COMMON)).eval()
    with pytest.raises(UnsupportedAttentionError, match=r"layers \[0, 1\] pair the values of one KV head"), \
            press_cls(0.5)(model):
        pass


@pytest.mark.parametrize("press", [lambda: QuickMergePress(0.5), lambda: QuickMergeInputPress(0.5, layer=0)],
                         ids=["kv", "input"])
def test_an_attention_older_than_the_attention_interface_is_refused(press):
    """Nemotron's attention keeps no ``scaling`` before transformers 5.13 (its own SDPA class): refused as the press
    is entered, the release named, instead of an AttributeError inside the prefill."""
    from packaging.version import Version

    from quickmerge.text.decoder import UnsupportedAttentionError

    if Version(transformers.__version__) >= Version("5.13"):
        pytest.skip("Nemotron's attention keeps a scaling from transformers 5.13 on (tested as a family there)")
    model = transformers.NemotronForCausalLM(transformers.NemotronConfig(**COMMON, head_dim=16, pad_token_id=0))
    with pytest.raises(UnsupportedAttentionError, match=r"keeps no `scaling`.*Nemotron's: 5\.13"), \
            press()(model.eval()):
        pass


def test_a_prefill_without_cache_raises():
    model = tiny("llama")
    with pytest.raises(RuntimeError, match="no KV cache"), QuickMergePress(0.5)(model), torch.no_grad():
        model(torch.randint(0, 97, (1, 30)), use_cache=False)
    # nothing to compress is fine: a one-token prompt at ratio 0.5 keeps its token
    with QuickMergePress(0.5)(model), torch.no_grad():
        model(torch.randint(0, 97, (1, 1)), **cache_kwargs(model, transformers.DynamicCache()))


def test_hooks_are_removed_when_the_block_raises():
    model = tiny("llama")
    with pytest.raises(RuntimeError), QuickMergePress(0.5)(model), torch.no_grad():
        model(torch.randint(0, 97, (1, 30)), use_cache=False)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "options",
    [{"budget": "entropy"}, {"align": True}, {"budget": "entropy", "align": True},
     {"budget": "entropy", "proportional": False}, {"scoring": "replay"}, {"scoring": "replay", "budget": "replay"},
     {"scoring": "replay", "budget": "replay", "proportional": False}],
)
def test_budgets_alignment_and_replay_keep_the_total_and_decode_like_the_plain_model(options):
    """Layers of different lengths decode inside the press exactly as an unpatched model decodes the same
    entries one token at a time (each merged entry repeated by its size; once without the bias)."""
    model = tiny("llama", layers=4)
    with torch.no_grad():  # layer 0's queries attend sharply: few entries carry its attention
        model.model.layers[0].self_attn.q_proj.weight.mul_(30.0)
    ids, cont = torch.randint(0, 97, (2, 40)), torch.randint(0, 97, (2, 5))
    press = QuickMergePress(0.5, window=8, **options)
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
        reference_cache = duplicated_cache(cache)
        merged = model(cont, **cache_kwargs(model, cache)).logits
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert sum(lengths) == 4 * (20 + 5) and press.achieved_ratio == pytest.approx(0.5)
    if options.get("budget") == "entropy":  # the focused layer gives entries to the diffuse ones
        assert lengths[0] < min(lengths[1:])
    elif options.get("budget") == "replay":
        assert len(set(lengths)) > 1
    with torch.no_grad():  # without the bias each entry appears once: positions must be given
        reference = torch.cat([model(cont[:, t : t + 1], **cache_kwargs(model, reference_cache),
                                     position_ids=torch.full((2, 1), 40 + t)).logits for t in range(5)], 1)
    assert torch.allclose(merged, reference, atol=1e-4)


@pytest.mark.parametrize("decoding", [{}, dict(decoding_size=12, decoding_interval=4)], ids=["prefill", "decoding"])
def test_kvpress_pipeline_keeps_proportional_attention_while_decoding(tmp_path, decoding):
    """... and merging while decoding, with the positions kvpress's pipeline passes."""
    pytest.importorskip("kvpress")
    import kvpress  # noqa: F401  (registers the pipeline)

    from quickmerge.text import for_kvpress_pipeline
    from tests.eval.conftest import save_tiny_lm

    path = save_tiny_lm(tmp_path / "lm")
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    pipe = transformers.pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    context, question = "The quick brown fox jumps over the lazy dog. " * 4, " Which animal jumps?"
    steps = 20 if decoding else 8
    press = QuickMergePress(0.5, window=8, **decoding)
    piped = pipe(context, question=question, press=for_kvpress_pipeline(press), max_new_tokens=steps)["answer"]
    assert press.achieved_ratio == pytest.approx(0.5, abs=0.02)
    assert (press.decoding_merges > 0) == bool(decoding)
    # the same greedy decoding by hand, inside the press (proportional attention on), on the pipeline's
    # inputs (without a chat template: BOS + context, then question + newline)
    ids = tokenizer(tokenizer.bos_token + context, return_tensors="pt", add_special_tokens=False).input_ids
    q = tokenizer(question + "\n", return_tensors="pt", add_special_tokens=False).input_ids
    cache, out = transformers.DynamicCache(), []
    with torch.no_grad(), QuickMergePress(0.5, window=8, **decoding)(model):
        model.model(ids, **cache_kwargs(model, cache))
        logits = model(q, **cache_kwargs(model, cache)).logits
        for _ in range(steps):
            out.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[out[-1]]]), **cache_kwargs(model, cache)).logits
    assert piped == tokenizer.decode(out, skip_special_tokens=True)
    with pytest.raises(TypeError, match="quickmerge press"):
        for_kvpress_pipeline("not a press")


def test_eviction_keeps_tied_entries_lowest_position_first():
    """A press's default merge keeps the top-scored entries; among tied scores the earliest positions, on every
    device (topk's own choice among ties differs between CPU and CUDA kernels)."""
    keys, values = torch.randn(2, 3, 300, 8), torch.randn(2, 3, 300, 8)
    scores = torch.zeros(2, 3, 300)
    scores[:, :, 250:] = 1.0  # the last 50 win, then 70 of the 250 tied
    out = RandomEvictionPress(0.6).merge(None, keys, values, scores, 120)
    kept = torch.cat([torch.arange(70), torch.arange(250, 300)])
    assert torch.equal(out.keys, keys[:, :, kept]) and torch.equal(out.values, values[:, :, kept])
