"""The presses on every further family in SUPPORTED_ARCHITECTURES (tests/text/tiny.py ``MORE_KINDS``): exact at
ratio 0, decoding equal to the duplicated-cache oracle, prompt scoring equal to the model's own attention weights
(logit caps and attention sinks included), each layer's rotation read off its cached keys, and a refusal, not a
silent mis-scoring, where the keys cannot be recomputed."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.call_arguments import layer_argument  # noqa: E402
from quickmerge.text import SUPPORTED_ARCHITECTURES, QuickMergeInputPress, QuickMergePress  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from quickmerge.text.decoder import (  # noqa: E402
    POSITION_KWARGS,
    UnsupportedAttentionError,
    base_model,
    decoder_attention_layers,
    decoder_layers,
    hidden_states_arg,
    key_rotation,
    kv_sources,
    plain_rotary,
    prerope_keys,
    rotate,
    sliding_window_of,
)
from quickmerge.text.latent import attended_keys  # noqa: E402
from quickmerge.text.scoring import observe  # noqa: E402
from tests.text.test_input_press import (  # noqa: E402
    _run,
    test_ratio_zero_is_exact_and_merging_shrinks_the_upper_layers,
)
from tests.text.tiny import (  # noqa: E402
    COMMON,
    MORE_KINDS,
    MROPE_KINDS,
    SHARING,
    duplicated_cache,
    mistral3_vlm,
    one_at_a_time,
    press_and_oracle,
    tiny,
)

# how each family rotates its keys, by layer: sliding layers first where they alternate
ROTATION = {"cohere": "interleaved", "glm": "interleaved", "glm4": "interleaved", "gpt-oss": "split",
            "llama4": ("interleaved", "none"),  # complex rotary tables on its chunked layers, none on the global ones
            "ernie4.5": "interleaved", "ernie4.5-moe": "interleaved", "helium": "interleaved",
            "cohere2": ("interleaved", "none"), "exaone4": ("half", "none"),  # global layers without RoPE
            "deepseek-v2-lite": "interleaved", "deepseek-v3": "deinterleaved", "glm4-moe-lite": "deinterleaved",
            "youtu": "deinterleaved", "mistral4": "deinterleaved", "opt": "none", "gpt2": "none",
            "gpt-bigcode": "none", "biogpt": "none"}  # latent attention: see LATENT_KINDS


def _expected_rotation(kind: str, attention) -> str:
    rotation = ROTATION.get(kind, "half")
    if isinstance(rotation, tuple):
        return rotation[0] if sliding_window_of(attention) is not None else rotation[1]
    return rotation


@pytest.mark.parametrize("kind", MORE_KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_ratio_zero_is_exact_and_decoding_equals_the_duplicated_cache(kind, attn):
    model = tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 3))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 24:]
        cache = transformers.DynamicCache()
        with QuickMergePress(0.0)(model):
            model(ids, **cache_kwargs(model, cache))
            assert torch.allclose(model(cont, **cache_kwargs(model, cache)).logits, reference, atol=1e-5)
        press, cache = QuickMergePress(0.5, window=4), transformers.DynamicCache()
        with press(model):
            model(ids, **cache_kwargs(model, cache))
            oracle = duplicated_cache(cache)
            merged = model(cont, **cache_kwargs(model, cache)).logits
        assert torch.allclose(merged, model(cont, **cache_kwargs(model, oracle)).logits, atol=1e-5)
    attentions = decoder_attention_layers(model)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [27 if sliding_window_of(a) is not None else 15 for a in attentions]  # global layers halved
    assert not torch.allclose(merged, reference, atol=1e-4)


def _recorded_prefill(model, ids, cache=None, **inputs):
    """An unpatched prefill of ``ids``: each attention layer's inputs ``{layer: {"hidden", *POSITION_KWARGS}}``,
    the cache, and the model's own attention weights (``output_attentions``, eager models)."""
    seen = {}

    def keep(module, args, kwargs):
        positions = {k: kwargs[k] for k in POSITION_KWARGS if k in kwargs}  # Ministral 3 scales queries by them
        seen[module.layer_idx] = dict(hidden=hidden_states_arg(args, kwargs), **positions)  # GPT-NeoX: positional

    handles = [a.register_forward_pre_hook(keep, with_kwargs=True) for a in decoder_attention_layers(model)]
    cache = transformers.DynamicCache() if cache is None else cache
    try:
        with torch.no_grad():
            weights = model(ids, **inputs, **cache_kwargs(model, cache), output_attentions=True).attentions
    finally:
        for handle in handles:
            handle.remove()
    return seen, cache, weights


@pytest.mark.parametrize("kind", MORE_KINDS)
def test_the_press_sees_the_attention_the_model_computes(kind):
    """What every scoring reads, the attention of prompt queries recomputed by the press, equals the model's own
    eager attention weights on each global layer: Gemma 2's capped logits and gpt-oss's sinks as the model
    applies them, Granite's multiplier, OLMo 2's norm across heads, Cohere's and GLM's rotations, NoPE layers."""
    model = tiny(kind, "eager")
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    attentions = decoder_attention_layers(model)
    seen, cache, weights = _recorded_prefill(model, ids)
    compared = 0
    for i, attention in enumerate(attentions):
        if sliding_window_of(attention) is not None:
            continue  # never scored: kept whole
        hidden, kwargs = seen[i].pop("hidden"), {**seen[i], "cache": cache}  # Llama 4 counts positions in its cache
        keys = attended_keys(attention, cache.layers[i].keys, cache.layers[i].values)  # a cached latent, expanded
        got = observe(attention, hidden, keys, kwargs, window=30).probs
        assert torch.allclose(got, weights[i].float(), atol=1e-5), (got - weights[i]).abs().max()
        compared += 1
    assert compared >= 1


@pytest.mark.parametrize("kind", MORE_KINDS)
def test_prompt_scoring_runs_on_the_global_layers_only(kind):
    model = tiny(kind, "eager")
    press, cache = QuickMergePress(0.5, scoring="prompt", window=4), transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(torch.randint(0, 97, (1, 30)), **cache_kwargs(model, cache))
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [30 if sliding_window_of(a) is not None else 15 for a in decoder_attention_layers(model)]


@pytest.mark.parametrize("kind", MORE_KINDS)
def test_each_layers_rotation_is_read_off_its_cached_keys(kind):
    model = tiny(kind, layers=3)
    attentions = decoder_attention_layers(model)
    seen, cache, _ = _recorded_prefill(model, torch.randint(0, 97, (1, 12)))
    for i, attention in enumerate(attentions):
        hidden, tables = seen[i]["hidden"], seen[i].get("position_embeddings")  # none: OPT's learned positions
        if kind == "llama4" and sliding_window_of(attention) is not None:
            # its chunked layers normalise keys after the rotation: refused, never scored (the KV press leaves them)
            with pytest.raises(UnsupportedAttentionError, match="no rotation"):
                key_rotation(attention, hidden, cache.layers[i].keys, tables)
            continue
        keys = attended_keys(attention, cache.layers[i].keys, cache.layers[i].values)  # a cached latent, expanded
        rotation = key_rotation(attention, hidden, keys, tables)
        assert rotation == _expected_rotation(kind, attention)
        with torch.no_grad():  # every position, not only the few the check reads
            recomputed = prerope_keys(attention, hidden)
            if tables is not None:
                recomputed = rotate(attention, recomputed, *plain_rotary(attention, tables), rotation)
        assert torch.allclose(recomputed, keys, atol=1e-5)


MINISTRAL3 = ("ministral3", "mistral3-vlm")  # queries scaled by position: batches of the input press tested below


GPT2_STACKS = ("gpt2", "gpt-bigcode")  # the input press is refused: their stack reshapes its output to the prompt


@pytest.mark.parametrize("kind", [k for k in MORE_KINDS if k not in (*MINISTRAL3, "llama4", *GPT2_STACKS)])
def test_input_press_is_exact_at_ratio_zero_and_shrinks_the_upper_layers(kind):
    test_ratio_zero_is_exact_and_merging_shrinks_the_upper_layers(kind, "sdpa")


@pytest.mark.parametrize("kind", GPT2_STACKS)
def test_the_input_press_is_refused_where_the_stack_reshapes_its_output_to_the_prompt(kind):
    """GPT-2's and GPT-BigCode's decoder stack views its last hidden states at the prompt's length, which a merged
    prompt no longer has: refused before any work, naming the press that does run there."""
    model = tiny(kind)
    with pytest.raises(ValueError, match=r"reshapes its output to the prompt's length.*use QuickMergePress"), \
            QuickMergeInputPress(0.5, layer=0)(model):
        pass


@pytest.mark.parametrize("scale_from", [8, 10_000], ids=["scaled-apart", "scaled-alike"])
def test_ministral3_merges_a_batch_as_it_merges_each_prompt_alone(scale_from):
    """Ministral 3 scales its queries by position (from ``original_max_position_embeddings`` on): each prompt of a
    batch goes through the upper layers at its own merged positions (``position_ids``, one row per prompt), as it
    does alone. Before transformers 5.4 the scale reads ``cache_position``, one row for the whole batch: a batch
    whose prompts merged to positions scaled differently (``scaled-apart``) is refused there, not scaled at the
    first prompt's positions; where the scale is 1 for all of them (``scaled-alike``) it merges."""
    model = tiny("ministral3", layers=3)
    model.config.rope_parameters["original_max_position_embeddings"] = scale_from  # read by each call
    generator = torch.Generator().manual_seed(3)
    ids, cont = torch.randint(0, 97, (2, 30), generator=generator), torch.randint(0, 97, (2, 6), generator=generator)

    def run(ids, cont):
        return _run(model, QuickMergeInputPress(0.5, layer=0, window=4), ids, cont)[0]

    alone = torch.cat([run(ids[i : i + 1], cont[i : i + 1]) for i in range(2)])
    attention = decoder_attention_layers(model)[0]
    if scale_from == 8 and "cache_position" in inspect.signature(attention.forward).parameters:
        with pytest.raises(UnsupportedAttentionError, match="merged to positions it scales differently"):
            run(ids, cont)
    else:
        assert torch.allclose(run(ids, cont), alone, atol=1e-5)


def _pixtral_prompt(batch: int):
    """Token ids with one image (four image tokens 96) amid text and the tiny Pixtral tower's inputs, for
    ``tiny("mistral3-vlm")``."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 90, (batch, 30), generator=g)
    ids = torch.cat([text[:, :5], torch.full((batch, 4), 96), text[:, 5:]], 1)
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return ids, dict(pixel_values=pixels, image_sizes=torch.tensor([[32, 32]] * batch))


@pytest.mark.parametrize("text", ["ministral3", "mistral", "mistral4"])
def test_mistral3_merges_the_cache_of_a_prompt_with_an_image(text):
    """Mistral3ForConditionalGeneration, the class of Ministral 3's checkpoints (Pixtral tower, Ministral 3 decoder),
    Mistral Small 3.x's (Mistral decoder) and Mistral 4's (its latent attention): with an image in the prompt the KV
    press is exact at ratio 0, decoding after merging equals the duplicated-cache oracle and generate runs inside it;
    the input press with ``token_ids`` merges the image's tokens only."""
    if text == "ministral3":
        model = tiny("mistral3-vlm", layers=3)
    elif text == "mistral4":
        model = mistral3_vlm(tiny("mistral4", layers=3).config).eval()
    else:
        torch.manual_seed(0)
        config = transformers.MistralConfig(**{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=None)
        model = mistral3_vlm(config).eval()
    ids, image = _pixtral_prompt(2)
    cont = torch.randint(1, 90, (2, 4))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1), **image).logits[:, -4:]
        assert not torch.allclose(reference, model(torch.cat([ids, cont], 1)).logits[:, -4:], atol=1e-3)
        cache = transformers.DynamicCache()
        with QuickMergePress(0.0)(model):
            model(ids, **image, **cache_kwargs(model, cache))
            assert torch.allclose(model(cont, **cache_kwargs(model, cache)).logits, reference, atol=1e-5)
        press, cache = QuickMergePress(0.5), transformers.DynamicCache()
        with press(model):
            model(ids, **image, **cache_kwargs(model, cache))
            oracle = duplicated_cache(cache)
            merged = model(cont, **cache_kwargs(model, cache)).logits
            generated = model.generate(ids, **image, max_new_tokens=3, do_sample=False)
        assert [layer.keys.shape[2] for layer in cache.layers] == [21, 21, 21]
        assert torch.allclose(merged, model(cont, **cache_kwargs(model, oracle)).logits, atol=1e-5)
        assert generated.shape == (2, 37)
        press, cache = QuickMergeInputPress(0.5, layer=0, token_ids=(96,)), transformers.DynamicCache()
        with press(model):
            model(ids[:1], **{k: v[:1] for k, v in image.items()}, **cache_kwargs(model, cache))
        assert [layer.keys.shape[2] for layer in cache.layers] == [34, 32, 32]  # 4 image tokens -> 2, text whole


@pytest.mark.parametrize("kind", ["cohere2", "gpt-oss", "gpt-neox", "opt", "deepseek-v3"])
def test_input_press_without_a_cache_rotates_as_the_layer_does(kind):
    """No cache holds the merge layer's keys: the layer's own attention, run over a few tokens, tells how it
    rotates them (Cohere 2's interleaved pairs, gpt-oss's split halves, GPT-NeoX's quarter of each head, taking its
    cache as ``layer_past``, OPT's none, DeepSeek V3's last channels), and the prompt merges as with a cache."""
    model = tiny(kind, layers=3)
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        with QuickMergeInputPress(0.5, layer=0, window=4)(model):
            cached = model(ids, **cache_kwargs(model, transformers.DynamicCache())).logits[:, -1]
        with QuickMergeInputPress(0.5, layer=0, window=4)(model):
            uncached = model(ids, use_cache=False).logits[:, -1]
    assert torch.allclose(cached, uncached, atol=1e-5)


def _hunyuan():
    torch.manual_seed(0)
    config = transformers.HunYuanDenseV1Config(**COMMON, head_dim=16)
    return transformers.HunYuanDenseV1ForCausalLM(config).eval()


def _stablelm_qk_norm():
    torch.manual_seed(0)
    config = transformers.StableLmConfig(**COMMON, qk_layernorm=True, pad_token_id=0)  # transformers 5.0 reads it
    return transformers.StableLmForCausalLM(config).eval()


@pytest.mark.parametrize("build", [_hunyuan, _stablelm_qk_norm], ids=["hunyuan-norm-after-rope", "stablelm-qk-norm"])
@pytest.mark.parametrize("press", [lambda: QuickMergePress(0.5), lambda: QuickMergeInputPress(0.5, layer=0)],
                         ids=["kv", "input"])
def test_keys_the_press_cannot_recompute_are_refused(build, press):
    """HunYuan normalises queries and keys after the rotation, StableLM (a tested class without them) with a norm per
    head of its own: recomputed queries would not be the model's, so the press refuses instead of scoring with them."""
    import contextlib

    model = build()
    untested = type(model).__name__ not in SUPPORTED_ARCHITECTURES
    with pytest.warns(UserWarning, match="untested") if untested else contextlib.nullcontext(), pytest.raises(
            UnsupportedAttentionError, match=type(decoder_attention_layers(model)[0]).__name__), torch.no_grad(), \
            press()(model):
        model(torch.randint(0, 97, (1, 20)), **cache_kwargs(model, transformers.DynamicCache()))


def _image_prompt(model, kind: str):
    """Two rows of text with one image each (4 tokens) and the pixels and grids :func:`tiny`'s towers take."""
    import inspect

    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 90, (2, 30), generator=g)
    ids = torch.cat([text[:, :5], torch.tensor([[94, 96, 96, 96, 96, 95]] * 2), text[:, 5:]], 1)
    image = dict(pixel_values=torch.randn(32, 1536 if kind == "qwen3-vl" else 1176, generator=g),
                 image_grid_thw=torch.tensor([[1, 4, 4], [1, 4, 4]]))
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # asked for from transformers 5.2x on
        image["mm_token_type_ids"] = (ids == 96).long()
    return ids, image


def _gptj():
    t = transformers
    return t.GPTJForCausalLM(t.GPTJConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8))


def _codegen():
    t = transformers
    return t.CodeGenForCausalLM(t.CodeGenConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                                rotary_dim=8, n_ctx=256))


def _bart():
    t = transformers
    return t.BartForCausalLM(t.BartConfig(vocab_size=97, d_model=64, decoder_layers=2, decoder_attention_heads=4,
                                          decoder_ffn_dim=96, encoder_layers=1))


def _xglm():
    t = transformers
    return t.XGLMForCausalLM(t.XGLMConfig(vocab_size=97, d_model=64, num_layers=2, attention_heads=4, ffn_dim=96))


@pytest.mark.parametrize("build,error,match", [
    (_xglm, UnsupportedAttentionError, "XGLMAttention.*keeps no `config`"),
    (_bart, TypeError, r"layers \[0, 1\] of BartForCausalLM attend to an encoder's output too"),
], ids=["xglm", "bart"])
@pytest.mark.parametrize("press", [lambda: QuickMergePress(0.5), lambda: QuickMergeInputPress(0.5, layer=0)],
                         ids=["kv", "input"])
def test_attention_the_presses_cannot_follow_is_refused_by_name(build, error, match, press):
    """Found by the presses' layer lookups since OPT's layout was added: XGLM's attention (no `config`), BART's
    decoder as a causal LM (cross-attention): refused as either press is entered, before a prefill runs into an
    AttributeError or an IndexError."""
    with pytest.raises(error, match=match), press()(build().eval()):
        pass


@pytest.mark.parametrize("build", [_gptj, _codegen], ids=["gpt-j", "codegen"])
def test_gptj_and_codegen_are_refused_by_the_kv_press(build):
    """GPT-J's and CodeGen's attention sit where GPT-2's does: before transformers 5.2x they keep no `scaling`
    (refused as the press is entered); later GPT-J's rotation and CodeGen's fused layout are not what the press
    recomputes, and the key check refuses them at the prefill instead of scoring with queries the model never
    computes."""
    model = build().eval()
    name = type(model.base_model.h[0].attn).__name__
    with pytest.raises(UnsupportedAttentionError, match=rf"attention of {name}"), torch.no_grad(), \
            QuickMergePress(0.5)(model):
        model(torch.randint(0, 97, (1, 24)), use_cache=True)


@pytest.mark.parametrize("kind", MROPE_KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_multimodal_rope_models_merge_their_cache_and_decode_on_the_duplicated_cache(kind, attn, with_image):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL: their tokens sit on three axes (an image on its grid, the text after it
    shifted); the merged cache decodes as the unpatched model on the duplicated cache does, ratio 0 exactly."""
    model = tiny(kind, attn, layers=3)
    if with_image:
        ids, image = _image_prompt(model, kind)
    else:
        ids, image = torch.randint(1, 90, (2, 30)), {}
    cont, n = torch.randint(1, 90, (2, 3)), ids.shape[1]
    reference, runs = press_and_oracle(model, ids, cont, image)
    for ratio, (merged, oracle, cache) in runs.items():
        assert torch.allclose(merged, oracle, atol=1e-5)
        assert [layer.keys.shape[2] for layer in cache.layers] == [n + 3 - round(ratio * n)] * 3
        assert torch.allclose(merged, reference, atol=1e-5) == (ratio == 0.0)


@pytest.mark.parametrize("kind", ["qwen2.5-vl", "qwen3-vl"])
def test_multimodal_rope_attention_is_the_models_own(kind):
    """With an image in the prompt, the attention the press recomputes equals the model's eager weights."""
    model = tiny(kind, "eager", layers=3)
    ids, image = _image_prompt(model, kind)
    attentions = decoder_attention_layers(model)
    seen, cache, weights = _recorded_prefill(model, ids, **image)
    for i, attention in enumerate(attentions):
        got = observe(attention, seen[i].pop("hidden"), cache.layers[i].keys, seen[i], window=ids.shape[1]).probs
        assert torch.allclose(got, weights[i].float(), atol=1e-5), (got - weights[i]).abs().max()


def _text_twin(model, kind: str):
    """The Qwen2 / Qwen3 causal LM with ``model``'s language model and head: on text alone, multimodal RoPE puts
    every token at (p, p, p), the plain rotary embedding at p, so the two compute the same."""
    text = model.config.get_text_config()
    config = {**COMMON, "num_hidden_layers": text.num_hidden_layers, "rms_norm_eps": text.rms_norm_eps,
              "rope_parameters": {"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]}}
    twin = (transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config, head_dim=16)) if kind == "qwen3-vl"
            else transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**config)))
    state = {**{f"model.{k}": v for k, v in model.model.language_model.state_dict().items()},
             **{f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()}}
    twin.load_state_dict(state)
    twin.set_attn_implementation(model.config._attn_implementation)
    return twin.eval()


# merge layers: the embeddings (-1) or after layer 0; Qwen3-VL adds image features after layer 0 (DeepStack)
MROPE_INPUT = [("qwen2-vl", -1), ("qwen2-vl", 0), ("qwen2.5-vl", -1), ("qwen2.5-vl", 0), ("qwen3-vl", 1)]


@pytest.mark.parametrize("kind,layer", MROPE_INPUT)
def test_the_input_press_on_multimodal_rope_text_equals_its_text_twin(kind, layer):
    """Merged tokens take the rotary rows of their positions from the three-axis table, and decoding continues."""
    model = tiny(kind, layers=3)
    twin = _text_twin(model, kind)
    ids, cont = torch.randint(1, 90, (2, 30)), torch.randint(1, 90, (2, 3))
    logits = []
    for m in (model, twin):
        cache = transformers.DynamicCache()
        with torch.no_grad(), QuickMergeInputPress(0.5, layer=layer, window=4)(m):
            logits.append((m(ids, **cache_kwargs(m, cache)).logits, m(cont, **cache_kwargs(m, cache)).logits))
    assert cache.layers[-1].keys.shape[2] == 18
    for ours, twins in zip(logits[0], logits[1], strict=True):
        assert torch.allclose(ours, twins, atol=1e-5)


@pytest.mark.parametrize("kind,layer", [k for k in MROPE_INPUT if k[0] != "qwen2-vl"])
@pytest.mark.parametrize("token_ids", [None, [96]], ids=["all-tokens", "image-tokens"])
def test_the_input_press_with_an_image_decodes_over_every_merged_entry(kind, layer, token_ids):
    """These models hand their layers no position ids (the three-axis positions, shifted after an image, are in the
    rotary table); the press's decoding masks continue the prompt's order, so a new token sees every merged entry:
    inside the press it decodes as outside it (one token, where the model itself lets it see the whole cache).
    Image tokens only (``token_ids``): the text stays whole."""
    model = tiny(kind, layers=3)
    ids, image = _image_prompt(model, kind)
    one = torch.randint(1, 90, (2, 1))
    logits = []
    for inside in (True, False):
        cache = transformers.DynamicCache()
        with torch.no_grad():
            with QuickMergeInputPress(0.5, layer=layer, window=4, token_ids=token_ids)(model):
                model(ids, **image, **cache_kwargs(model, cache))
                if inside:
                    logits.append(model(one, **cache_kwargs(model, cache)).logits)
            if not inside:
                logits.append(model(one, **cache_kwargs(model, cache)).logits)
    assert cache.layers[-1].keys.shape[2] == (19 if token_ids is None else 35)
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


@pytest.mark.parametrize("layer", [-1, 0])
def test_the_input_press_keeps_deepstack_layers_whole(layer):
    model = tiny("qwen3-vl", layers=3)
    with pytest.raises(ValueError, match="DeepStack"), QuickMergeInputPress(0.5, layer=layer)(model):
        pass


def test_keys_the_model_overflowed_are_named_not_blamed_on_the_architecture():
    """Gemma 3 overflows in float16 (its own keys turn infinite); the check says so instead of refusing the class."""
    model = tiny("llama")
    ids = torch.randint(0, 97, (1, 12))
    seen = {}

    def keep(module, args, kwargs):
        seen[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    attention = decoder_attention_layers(model)[0]
    handle = attention.register_forward_pre_hook(keep, with_kwargs=True)
    cache = transformers.DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(model, cache))
    handle.remove()
    keys = cache.layers[0].keys.clone()
    keys[0, 1, -1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"not finite .* bfloat16 or float32"):
        key_rotation(attention, seen[0][0], keys, seen[0][1])


@pytest.mark.parametrize("kind", ["gemma2", "gpt-oss"])
def test_aligned_merges_follow_the_cap_and_the_sinks(kind):
    """``align=True`` runs on Gemma 2's capped logits and gpt-oss's sinks (the fit itself is checked against them in
    test_alignment.py): decoding equals the duplicated-cache oracle and comes closer to the full cache's than the
    plain group means do."""
    model = tiny(kind, "eager")
    ids, cont = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 3))
    outputs = {}
    with torch.no_grad():
        for align in (False, True):
            press, cache = QuickMergePress(0.5, window=8, align=align), transformers.DynamicCache()
            with press(model):
                model(ids, **cache_kwargs(model, cache))
                oracle = duplicated_cache(cache)
                outputs[align] = model(cont, **cache_kwargs(model, cache)).logits
            assert torch.allclose(outputs[align], model(cont, **cache_kwargs(model, oracle)).logits, atol=1e-5)
        full = model(torch.cat([ids, cont], 1)).logits[:, 24:]
    assert (outputs[True] - full).abs().mean() < (outputs[False] - full).abs().mean()


def _read_twice_reference(model, ids, image):
    """Replay scores from first principles: the language model (eager) reads the prompt's own inputs twice in one
    pass, the copy's positions moved on by the prompt's largest + 1 (an image keeps its grid, Qwen3-VL's image
    features added to both copies); ``[B, Hkv, n]``: the most attention each prompt entry gets from the copy."""
    seen = {}
    base = model.model.language_model
    handle = base.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        model(ids, **image, **cache_kwargs(model, transformers.DynamicCache()))
    handle.remove()
    positions, embeds, n = seen["position_ids"], seen["inputs_embeds"], ids.shape[1]
    twice = dict(inputs_embeds=torch.cat([embeds, embeds], 1),
                 position_ids=torch.cat([positions, positions + positions.amax((0, 2), keepdim=True) + 1], -1))
    if seen.get("visual_pos_masks") is not None:  # Qwen3-VL's DeepStack: features of each row's image tokens
        masks, b = seen["visual_pos_masks"], ids.shape[0]
        twice["visual_pos_masks"] = torch.cat([masks, masks], 1)
        twice["deepstack_visual_embeds"] = [e.view(b, 1, -1, e.shape[-1]).expand(-1, 2, -1, -1).reshape(-1, e.shape[-1])
                                            for e in seen["deepstack_visual_embeds"]]
    ones = torch.ones(ids.shape[0], 2 * n, dtype=torch.long)  # without a cache or mask, transformers 5.2 reads
    with torch.no_grad():  # Qwen3-VL's repeated temporal positions as packed sequences
        weights = base(**twice, attention_mask=ones, use_cache=False, output_attentions=True).attentions
    hkv = model.config.get_text_config().num_key_value_heads
    return [w[:, :, n:, :n].amax(2).unflatten(1, (hkv, -1)).amax(2) for w in weights]


@pytest.mark.parametrize("kind", MROPE_KINDS)
def test_replay_rereads_an_image_prompt_at_its_own_positions(kind, monkeypatch):
    """Replay scoring re-reads a prompt with an image as the model read it: three-axis positions moved on past the
    prompt (not text positions), DeepStack features added again; equal to reading it twice in one pass."""
    from quickmerge.text import quickmerge_press

    model = tiny(kind, "eager", layers=3)
    ids, image = _image_prompt(model, kind)
    got, replay_scores = [], quickmerge_press.replay_scores

    def recorded(*args, **kwargs):
        scores = replay_scores(*args, **kwargs)
        got.append({i: s.clone() for i, s in scores.items()})  # before the press marks its sinks in them
        return scores

    monkeypatch.setattr(quickmerge_press, "replay_scores", recorded)
    with torch.no_grad(), QuickMergePress(0.5, scoring="replay")(model):
        model(ids, **image, **cache_kwargs(model, transformers.DynamicCache()))
    for layer, expected in enumerate(_read_twice_reference(model, ids, image)):
        assert torch.allclose(got[0][layer], expected, atol=1e-5), (got[0][layer] - expected).abs().max()


@pytest.mark.parametrize("kind", ["gemma4", "gemma3n"])
def test_gemma_merges_each_layers_own_input_with_the_prompt(kind):
    """Gemma 4 and Gemma 3n give every layer an input of its own per token (``per_layer_input``, second and third
    argument): above the merge, a merged token's is the mean over its run, as its hidden state is (layer -1: plain
    means of runs of the embeddings; Gemma 3n's hidden states are AltUp streams ``[A, B, N, D]``, each merged)."""
    model = tiny(kind, layers=3)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(2))
    press, seen = QuickMergeInputPress(0.5, layer=-1), {}

    def capture(name):
        def hook(module, args, kwargs):
            tokens = hidden_states_arg(args, kwargs)
            tokens = tokens[:, 0] if tokens.dim() == 4 else tokens[0]  # [streams, N, D] or [N, D]: batch row 0
            seen[name] = dict(input=layer_argument(module, args, kwargs, "per_layer_input")[0], hidden=tokens)
            if press._positions is not None:
                seen["positions"] = press._positions[0].clone()
        return hook

    layer = decoder_layers(model)[0]
    with torch.no_grad():
        handle = layer.register_forward_pre_hook(capture("whole"), with_kwargs=True)
        model(ids)
        handle.remove()
        with press(model):
            handle = layer.register_forward_pre_hook(capture("merged"), with_kwargs=True)
            model(ids)
            handle.remove()
    positions = seen["positions"]
    assert positions.shape == (15,)
    starts = [0, *(positions[:-1] + 1).tolist()]
    for name in ("input", "hidden"):
        whole, merged = seen["whole"][name], seen["merged"][name]
        assert merged.shape[-2] == 15
        want = torch.stack([whole[..., a : b + 1, :].mean(-2) for a, b in zip(starts, positions.tolist(), strict=True)],
                           dim=-2)
        assert torch.allclose(merged, want, atol=1e-6), name
        assert not torch.allclose(merged, whole[..., positions, :], atol=1e-4)  # some runs hold several tokens


def _gemma4_image_prompt(batch: int):
    """Token ids with one image (begin 94, four image tokens 96, end 95) amid text and the tiny Gemma 4 tower's
    patches: 6 x 6 of 4 x 4 pixels with their (x, y) positions, pooled 3 x 3 to four tokens."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 90, (batch, 30), generator=g)
    ids = torch.cat([text[:, :5], torch.tensor([[94, 96, 96, 96, 96, 95]] * batch), text[:, 5:]], 1)
    y, x = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    positions = torch.stack([x.flatten(), y.flatten()], -1)[None].expand(batch, -1, -1)
    return ids, dict(pixel_values=torch.rand(batch, 36, 48, generator=g), image_position_ids=positions,
                     mm_token_type_ids=(ids == 96).long())


def _gemma3n_image_prompt(batch: int):
    """Token ids with one image (begin 94, four image tokens 96, end 95) amid text, and its 64 x 64 pixels."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 90, (batch, 24), generator=g)
    ids = torch.cat([text[:, :5], torch.tensor([[94, 96, 96, 96, 96, 95]] * batch), text[:, 5:]], 1)
    return ids, dict(pixel_values=torch.rand(batch, 3, 64, 64, generator=g))


@pytest.mark.parametrize("kind", ["gemma4-vlm", "gemma3n-vlm"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gemma_merges_a_prompt_with_an_image(kind, attn):
    """Gemma4ForConditionalGeneration and Gemma3nForConditionalGeneration, the classes of the checkpoints: with an
    image in the prompt the KV press is exact at ratio 0 and its merged cache decodes as the duplicated-cache oracle
    (Gemma 3n's layers reading an earlier layer's cache included); the input press is exact at ratio 0 and with
    ``token_ids`` merges the image's tokens only."""
    model = tiny(kind, attn, layers=3)
    ids, image = (_gemma4_image_prompt if kind == "gemma4-vlm" else _gemma3n_image_prompt)(2)
    cont, n = torch.randint(1, 90, (2, 3)), ids.shape[1]
    with torch.no_grad():
        assert not torch.allclose(model(ids, **image).logits, model(ids).logits, atol=1e-3)
    reference, runs = press_and_oracle(model, ids, cont, image)
    for ratio, (merged, oracle, _) in runs.items():
        assert torch.allclose(merged, oracle, atol=1e-5)
        assert torch.allclose(merged, reference, atol=1e-5) == (ratio == 0.0)
    assert [layer.keys.shape[2] for layer in runs[0.5][2].layers] == [
        n + 3 if sliding_window_of(a) is not None else n + 3 - n // 2 for a in decoder_attention_layers(model)]
    with torch.no_grad():
        for ratio, token_ids, kept in ((0.0, None, n), (0.5, (96,), n - 2)):
            cache = transformers.DynamicCache()
            with QuickMergeInputPress(ratio, layer=0, token_ids=token_ids)(model):
                model(ids, **image, **cache_kwargs(model, cache))
                logits = model(cont, **cache_kwargs(model, cache)).logits
            assert [layer.keys.shape[2] for layer in cache.layers][1:] == [kept + 3] * 2
            assert torch.allclose(logits, reference, atol=1e-5) == (ratio == 0.0)


@pytest.mark.parametrize("kind", ["gpt2", "gpt-bigcode", "gpt-neox", "opt", "biogpt"])
def test_generate_with_learned_or_fused_positions_decodes_as_token_by_token(kind):
    """``generate`` places new tokens from the attention mask it grows (GPT-2's, OPT's and BioGPT's learned positions
    read them), the press from the cache's original length: inside the press both pick the same greedy tokens."""
    model = tiny(kind, "sdpa")
    prompt = torch.randint(1, 90, (1, 24), generator=torch.Generator().manual_seed(0))
    press = QuickMergePress(0.5, window=4)
    _assert_generate_decodes_as_token_by_token(model, press, prompt)
    assert press.achieved_ratio == pytest.approx(0.5)


def _assert_generate_decodes_as_token_by_token(model, press, prompt, steps=4, new_cache=None):
    """Greedy ``generate`` inside ``press`` picks the tokens that a prefill and one call per token pick inside it
    (on the cache ``new_cache()`` makes, default ``DynamicCache()``)."""
    with torch.no_grad(), press(model):
        model.generation_config.eos_token_id = None  # every step, whichever tokens come
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                   do_sample=False)[0, prompt.shape[1]:]
        cache, tokens = (new_cache or transformers.DynamicCache)(), []
        logits = model(prompt, **cache_kwargs(model, cache)).logits[:, -1]
        for _ in range(steps):
            tokens.append(logits.argmax(-1))
            logits = model(tokens[-1][:, None], **cache_kwargs(model, cache)).logits[:, -1]
    assert generated.tolist() == torch.cat(tokens).tolist()


@pytest.mark.parametrize("kind", SHARING)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layers_reading_an_earlier_layers_cache_attend_with_its_mask(kind, attn):
    """Gemma 3n's and Gemma 4's last ``num_kv_shared_layers`` layers attend with the keys and values of the last
    layer of their type before them (here layers 3-5 read layers 1, 2, 1) and own no cache. The press merges the
    source layers' cache and hands the readers the source's mask of each call, proportional bias included: several
    new tokens at once, and Gemma 4's readers that take only the last ``logits_to_keep`` queries, decode as on the
    duplicated cache (the oracle); ``generate``, whose prefill keeps one position, as token by token."""
    model = tiny(kind, attn)
    assert kv_sources(model, decoder_layers(model)) == {3: 1, 4: 2, 5: 1}
    ids, cont = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 3))
    cache = transformers.DynamicCache()
    with torch.no_grad(), QuickMergePress(0.5, window=4)(model):
        model(ids, **cache_kwargs(model, cache))
        oracle = duplicated_cache(cache)
        last = model(cont, **cache_kwargs(model, cache), logits_to_keep=1).logits
    assert [layer.keys.shape[2] for layer in cache.layers] == [27, 15, 27]
    with torch.no_grad():
        expected = model(cont, **cache_kwargs(model, oracle)).logits
    assert torch.allclose(last, expected[:, -1:], atol=1e-5), (last - expected[:, -1:]).abs().max()
    _assert_generate_decodes_as_token_by_token(model, QuickMergePress(0.5, window=4), ids[:1])


@pytest.mark.parametrize("kind", ["gemma3n-vlm", "gemma4-vlm"])
def test_replay_rereads_the_layers_own_inputs_of_a_vision_language_prompt(kind):
    """Gemma 3n's and Gemma 4's vision-language classes hand their decoder the prompt as embeddings with each layer's
    own per-token inputs (``per_layer_inputs``, looked up from the token ids) beside them; replay scoring reads the
    prompt again with both: a text prompt is scored as when the decoder is given the token ids (Gemma 3n's would
    lose the token part of those inputs), and an image prompt is scored at all (Gemma 4's decoder cannot find the
    token ids back from image embeddings)."""
    model = tiny(kind)
    ids = torch.randint(1, 90, (1, 30), generator=torch.Generator().manual_seed(4))
    scores = []
    for call in (model, base_model(model)):
        press = QuickMergePress(0.5, scoring="replay")
        with torch.no_grad(), press(model):
            call(input_ids=ids, **cache_kwargs(call, transformers.DynamicCache()))
            scores.append(press._replayed)  # the replay's attention to each prompt entry, {layer: [B, Hkv, L]}
    assert scores[0].keys() == scores[1].keys()
    for layer, got in scores[0].items():
        assert torch.allclose(got, scores[1][layer], rtol=1e-4, atol=1e-7), layer
    ids, image = (_gemma3n_image_prompt if kind == "gemma3n-vlm" else _gemma4_image_prompt)(1)
    cache = transformers.DynamicCache()
    with torch.no_grad(), QuickMergePress(0.5, scoring="replay")(model):
        model(ids, **image, **cache_kwargs(model, cache))
    n = ids.shape[1]
    assert [layer.keys.shape[2] for layer in cache.layers] == [
        n if sliding_window_of(a) is not None else n - n // 2 for a in decoder_attention_layers(model)]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_llama4_merges_a_prompt_with_an_image(attn):
    """Llama4ForConditionalGeneration, the class of Llama 4's checkpoints, holds a whole causal LM as its language
    model: the KV press finds its decoder there and, text or an image in the prompt, is exact at ratio 0 and decodes
    as the duplicated-cache oracle (its chunked layers kept whole); the input press is refused (chunked attention)."""
    model = tiny("llama4-vlm", attn)
    g = torch.Generator().manual_seed(0)
    ids, cont = torch.randint(1, 90, (2, 24), generator=g), torch.randint(1, 90, (2, 3), generator=g)
    image = ids.clone()
    image[:, 4:8] = 96
    pixels = dict(pixel_values=torch.rand(2, 3, 56, 56, generator=g))
    try:
        with torch.no_grad():
            assert not torch.allclose(model(image, **pixels).logits, model(image).logits, atol=1e-3)
    except AttributeError as error:  # transformers 5.24: 'MoeCausalLMOutputWithPast' has no 'image_outputs'
        pytest.skip(f"transformers {transformers.__version__}'s own Llama 4 forward fails, without quickmerge: {error}")
    for prompt, inputs in ((ids, {}), (image, pixels)):
        reference, runs = press_and_oracle(model, prompt, cont, inputs)
        for ratio, (merged, oracle, _) in runs.items():
            assert torch.allclose(merged, oracle, atol=1e-5)
            assert torch.allclose(merged, reference, atol=1e-5) == (ratio == 0.0)
        assert [layer.keys.shape[2] for layer in runs[0.5][2].layers] == [27, 15, 27, 15]
    with pytest.raises(ValueError, match="attend within chunks"), QuickMergeInputPress(0.5, layer=0)(model):
        pass


@pytest.mark.parametrize("kind", SHARING)
def test_the_input_press_gives_layers_reading_an_earlier_layers_cache_its_mask(kind):
    """Under the input press the layers that read an earlier layer's keys and values attend with that layer's mask of
    the same call (merged positions at prefill, then each decoded token's), so a cache made from the config, whose
    sliding layers keep their window only, decodes as a plain one; ``generate`` (Gemma 4 would run those layers on
    the last position alone, cut from the unmerged prompt's tables) decodes as token by token. The merge layer must
    sit below the layers read."""
    model = tiny(kind)
    ids, cont = torch.randint(1, 90, (1, 30)), torch.randint(1, 90, (1, 12))
    seen = {}

    def keep(module, args, kwargs):
        seen.setdefault(module.layer_idx, []).append(kwargs["attention_mask"])

    attentions = [layer.self_attn for layer in decoder_layers(model)]
    handles = [a.register_forward_pre_hook(keep, with_kwargs=True) for a in attentions]
    logits = []
    try:
        for cache in (transformers.DynamicCache(), transformers.DynamicCache(config=model.config)):
            seen.clear()
            with torch.no_grad(), QuickMergeInputPress(0.5, layer=0)(model):
                model(ids, **cache_kwargs(model, cache))
                logits.append(one_at_a_time(model, cont, cache))
            assert cache.layers[1].keys.shape[2] == 15 + 12  # the global layer read by layers 3 and 5
            for reader, source in {3: 1, 4: 2, 5: 1}.items():
                assert len(seen[reader]) == len(seen[source]) == 13
                assert all(a is b for a, b in zip(seen[reader], seen[source], strict=True))
    finally:
        for handle in handles:
            handle.remove()
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    _assert_generate_decodes_as_token_by_token(model, QuickMergeInputPress(0.5, layer=0), ids)
    with pytest.raises(ValueError, match=r"layer must be below 1 .* layers 3-5 attend with the keys and values of "
                                         r"layers \[1, 2\]"), QuickMergeInputPress(0.5, layer=1)(model):
        pass


def test_sharing_the_presses_cannot_follow_is_refused():
    """A config announcing more layers reading other layers' caches than its modules mark (a renamed flag) is refused
    by both presses rather than merged without the readers."""
    model = tiny("gemma3n")
    reader = model.model.layers[5].self_attn
    del reader.is_kv_shared_layer
    reader.k_proj = getattr(reader, "k_proj", None) or torch.nn.Linear(64, 32)  # a layer that seems to attend alone
    for press in (QuickMergePress(0.5), QuickMergeInputPress(0.5, layer=0)):
        with pytest.raises(UnsupportedAttentionError, match=r"last 3 layers .* but layers \[3, 4\] are marked"), \
                press(model):
            pass


def test_the_input_press_refuses_chunked_attention():
    """Llama 4's chunked-attention layers (each token attends within its chunk) would need chunk masks at the merged
    positions, which the input press does not build: refused before any work (the KV press leaves those layers
    alone, as it does sliding windows, and merges the global ones: the family tests above)."""
    model = tiny("llama4")
    with pytest.raises(ValueError, match=r"layers \[0, 2\] of Llama4ForCausalLM attend within chunks"), \
            QuickMergeInputPress(0.5, layer=0)(model):
        pass
