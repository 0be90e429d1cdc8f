"""The KV press on hybrid models (tests/text/tiny.py ``HYBRID_KINDS``): attention layers amid layers whose state does
not grow with the prompt. Qwen 3.5, its mixture of experts and Qwen3-Next run three gated-DeltaNet (linear-attention)
layers to each attention layer, whose queries carry an output gate; LFM2 (and its mixture of experts) short
convolutions (LFM2-VL under a vision tower); Granite 4, Bamba, Jamba and Nemotron-H Mamba blocks (Nemotron-H also
layers of experts or an MLP alone); Falcon-H1 a Mamba 2 block beside the attention in every layer; Kimi Linear delta
attention with a short convolution and latent attention in turn. Only the attention
layers hold a KV cache; the press merges theirs and leaves the other states as an unpatched prefill leaves them.
Before transformers 5.5 these models keep a cache class of their own, without layers, and the press refuses them.
Decoding runs one token per call: transformers 5.5 continues a linear-attention state wrongly over several new tokens
in one call (not the press's doing; right from 5.12)."""

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from packaging.version import Version  # noqa: E402

from quickmerge.text import QuickMergeInputPress, QuickMergePress  # noqa: E402
from quickmerge.text.cache import UnsupportedCacheError, cache_kwargs, own_cache_class  # noqa: E402
from quickmerge.text.decoder import (  # noqa: E402
    base_model,
    decoder_attention_layers,
    decoder_layers,
    keeps_fixed_state,
    mixes_no_tokens,
    sliding_window_of,
)
from quickmerge.text.latent import attended_keys  # noqa: E402
from quickmerge.text.scoring import observe  # noqa: E402
from tests.text.test_architectures import (  # noqa: E402
    _assert_generate_decodes_as_token_by_token,
    _image_prompt,
    _recorded_prefill,
)
from tests.text.tiny import HYBRID_KINDS, duplicated_cache, one_at_a_time, press_and_oracle, tiny  # noqa: E402

CLASSES = {"qwen3.5": "Qwen3_5ForCausalLM", "qwen3.5-moe": "Qwen3_5MoeForCausalLM",
           "qwen3-next": "Qwen3NextForCausalLM", "qwen3.5-vl": "Qwen3_5ForConditionalGeneration",
           "olmo-hybrid": "OlmoHybridForCausalLM", "lfm3": "Lfm3ForCausalLM", "lfm2": "Lfm2ForCausalLM",
           "lfm3-vl": "Lfm3VlForConditionalGeneration",
           "lfm2-moe": "Lfm2MoeForCausalLM", "lfm2-vl": "Lfm2VlForConditionalGeneration",
           "granite4": "GraniteMoeHybridForCausalLM",
           "falcon-h1": "FalconH1ForCausalLM", "bamba": "BambaForCausalLM", "jamba": "JambaForCausalLM",
           "nemotron-h": "NemotronHForCausalLM", "kimi-linear": "KimiLinearForCausalLM"}
# the layers of a fixed-size state in each tiny model (tests/text/tiny.py), and those of an MLP alone
FIXED = {"falcon-h1": [0, 1], "qwen3.5": [0, 1, 2], "qwen3.5-moe": [0, 1, 2], "qwen3-next": [0, 1, 2],
         "qwen3.5-vl": [0, 1, 2], "nemotron-h": [0, 3], "lfm3": [0, 1, 3, 5],
         "lfm3-vl": [0, 1, 3, 5]}
MLP_ONLY = {"nemotron-h": [2]}


def _hybrid(kind: str, attn: str = "sdpa", layered: bool = True):
    """``tiny(kind)``; skipped where this transformers lacks the class, or (``layered``) keeps the model's states in a
    cache class of its own (before 5.5; OLMo Hybrid before 5.15)."""
    if not hasattr(transformers, CLASSES[kind]):
        pytest.skip(f"this transformers has no {CLASSES[kind]}")
    model = tiny(kind, attn)
    if layered and own_cache_class(base_model(model)) is not None:
        pytest.skip(f"transformers {transformers.__version__} keeps {CLASSES[kind]}'s states in a cache of its own")
    return model


def _fixed_states(cache, model):
    """Copies of the fixed-size states (convolution, recurrent: linear attention, Mamba) of the layers that keep one."""
    def copied(state):
        if isinstance(state, dict):  # one entry per state (transformers 5.2x)
            return [copied(v) for _, v in sorted(state.items())]
        return None if state is None else state.clone()

    return [(copied(layer.conv_states), copied(layer.recurrent_states))
            for block, layer in zip(decoder_layers(model), cache.layers, strict=True) if keeps_fixed_state(block)]


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_the_layers_of_each_kind_are_told_apart(kind):
    """Which layers attend, keep a fixed-size state or mix no tokens, read off the modules as each model builds them
    (in every release, whichever cache the model keeps)."""
    model = _hybrid(kind, layered=False)
    layers = decoder_layers(model)
    assert [i for i, layer in enumerate(layers) if keeps_fixed_state(layer)] == FIXED.get(kind, [0, 2])
    assert [i for i, layer in enumerate(layers) if mixes_no_tokens(layer)] == MLP_ONLY.get(kind, [])
    attending = [a.layer_idx for a in decoder_attention_layers(model)]
    want = {"falcon-h1": [0, 1], "nemotron-h": [1, 4], "lfm3": [2, 4, 6], "lfm3-vl": [2, 4, 6]}.get(
        kind, [3] if kind.startswith("qwen") else [1, 3])
    assert attending == want


def test_a_layer_of_an_mlp_alone_mixes_no_tokens():
    """Nemotron-H's MLP layers ("-", from transformers 5.12 on; experts alone, "E", in the tiny model) are told apart
    from its Mamba and attention layers, and the press merges the attention layers' caches around them."""
    if not hasattr(transformers, "NemotronHForCausalLM"):
        pytest.skip("this transformers has no Nemotron-H")
    model = _hybrid("nemotron-h", layered=False)
    config = model.config.to_dict()
    config["layers_block_type" if "layers_block_type" in config else "layer_types"] = None
    try:
        model = transformers.NemotronHForCausalLM(transformers.NemotronHConfig(**{
            **config, "hybrid_override_pattern": "M*-M*"})).eval()
    except KeyError:
        pytest.skip(f"transformers {transformers.__version__}'s Nemotron-H has no MLP layers")
    layers = decoder_layers(model)
    assert [i for i, layer in enumerate(layers) if mixes_no_tokens(layer)] == [2]
    assert [i for i, layer in enumerate(layers) if keeps_fixed_state(layer)] == [0, 3]
    if own_cache_class(base_model(model)) is not None:
        return
    try:
        cache = transformers.DynamicCache(config=model.config)
    except KeyError as error:  # 5.14: its own cache has no layer for "mlp"; an unpatched cached forward fails too
        pytest.skip(f"transformers {transformers.__version__}'s DynamicCache cannot hold Nemotron-H's MLP layers "
                    f"(KeyError {error}), without quickmerge")
    with torch.no_grad(), QuickMergePress(0.5, window=4)(model):
        model(torch.randint(1, 90, (1, 24)), **cache_kwargs(model, cache))
    assert [cache.layers[i].keys.shape[2] for i in (1, 4)] == [12, 12]


@pytest.mark.parametrize("kind", HYBRID_KINDS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("scoring", ["window", "replay"])
def test_the_attention_layers_merge_and_the_other_layers_keep_their_state(kind, attn, scoring):
    """Ratio 0 decodes as an unpatched cache does; at 0.5 each attention layer holds half the prompt, decoding equals
    the duplicated-cache oracle, and the fixed-size states equal an unpatched prefill's (replay scoring reads the
    prompt through them a second time). (Bamba's own decoding differs from its whole-sequence forward by ~3e-3.)"""
    model = _hybrid(kind, attn)
    ids, cont = torch.randint(1, 90, (2, 24)), torch.randint(1, 90, (2, 3))
    with torch.no_grad():
        plain = transformers.DynamicCache(config=model.config)
        model(ids, **cache_kwargs(model, plain))
        plain_states = _fixed_states(plain, model)
        reference = one_at_a_time(model, cont, plain)
        cache = transformers.DynamicCache(config=model.config)
        with QuickMergePress(0.0, scoring=scoring)(model):
            model(ids, **cache_kwargs(model, cache))
            assert torch.allclose(one_at_a_time(model, cont, cache), reference, atol=1e-5)
        press, cache = QuickMergePress(0.5, window=4, scoring=scoring), transformers.DynamicCache(config=model.config)
        with press(model):
            model(ids, **cache_kwargs(model, cache))
            states = _fixed_states(cache, model)
            oracle = duplicated_cache(cache)
            merged = one_at_a_time(model, cont, cache)
        assert torch.allclose(merged, one_at_a_time(model, cont, oracle), atol=1e-5)
    full = [a.layer_idx for a in decoder_attention_layers(model) if sliding_window_of(a) is None]
    assert [cache.layers[i].keys.shape[2] for i in full] == [12 + 3] * len(full)  # LFM3's sliding layer left alone
    assert len(states) == len(FIXED.get(kind, [0, 2]))
    assert _same(states, plain_states)
    assert not torch.allclose(merged, reference, atol=1e-4)


def _lfm2_image_prompt():
    """Two rows of text with one image each (4 tokens) and what :func:`tiny`'s SigLIP 2 tower takes: 4 x 4 patches of
    4 x 4 pixels, flattened, with their grid and mask (LFM2-VL pools 2 x 2 patches into a token)."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 90, (2, 30), generator=g)
    ids = torch.cat([text[:, :5], torch.tensor([[94, 96, 96, 96, 96, 95]] * 2), text[:, 5:]], 1)
    return ids, dict(pixel_values=torch.randn(2, 16, 3 * 4 * 4, generator=g), spatial_shapes=torch.tensor([[4, 4]] * 2),
                     pixel_attention_mask=torch.ones(2, 16, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["qwen3.5-vl", "lfm2-vl", "lfm3-vl"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_hybrid_with_an_image_in_the_prompt_merges_as_with_text(kind, attn):
    """The classes of Qwen 3.5's, LFM2-VL's and LFM3-VL's checkpoints: with an image in the prompt (Qwen's tokens on
    three axes, multimodal RoPE) ratio 0 is exact and the merged cache decodes as the duplicated-cache oracle (LFM3's
    sliding layer left alone)."""
    model = _hybrid(kind, attn)
    if kind == "lfm2-vl":
        ids, image = _lfm2_image_prompt()
    else:  # Qwen's layout of patches and grids; LFM3-VL's tower takes 2 x 3 x 4 x 4 values a patch
        ids, image = _image_prompt(model, "qwen3-vl")
        if kind == "lfm3-vl":
            image["pixel_values"] = image["pixel_values"][:, : 2 * 3 * 4 * 4]
    cont, n = torch.randint(1, 90, (2, 3)), ids.shape[1]
    reference, runs = press_and_oracle(model, ids, cont, image, new_cache=lambda: transformers.DynamicCache(
        config=model.config), decode=one_at_a_time)
    full = [a.layer_idx for a in decoder_attention_layers(model) if sliding_window_of(a) is None]
    for ratio, (merged, oracle, cache) in runs.items():
        assert torch.allclose(merged, oracle, atol=1e-5)
        assert [cache.layers[i].keys.shape[2] for i in full] == [n + 3 - round(ratio * n)] * len(full)
        assert torch.allclose(merged, reference, atol=1e-5) == (ratio == 0.0)


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_the_press_sees_the_attention_the_model_computes(kind):
    """The attention of prompt queries the press recomputes equals the model's own eager weights on the last attention
    layer: Qwen 3.5's query projection with an output gate per head (the press scores with the query half), LFM2's
    query and key norms, Falcon-H1's scaled keys, the attention layers of Granite 4, Jamba and Nemotron-H without
    position embedding."""
    model = _hybrid(kind, "eager")
    ids = torch.randint(1, 90, (1, 30), generator=torch.Generator().manual_seed(1))
    seen, cache, weights = _recorded_prefill(model, ids, cache=transformers.DynamicCache(config=model.config))
    attention = decoder_attention_layers(model)[-1]
    i = attention.layer_idx
    keys = attended_keys(attention, cache.layers[i].keys, cache.layers[i].values)  # Kimi Linear's latent, expanded
    got = observe(attention, seen[i].pop("hidden"), keys, seen[i], window=30).probs
    want = [w for w in weights if w is not None][-1]
    assert torch.allclose(got, want.float(), atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("kind", HYBRID_KINDS)
def test_the_input_press_is_refused_and_an_unlayered_cache_too(kind):
    """The input press would hand the layers of a fixed-size state a merged prompt they take no positions or masks
    for: refused before any work, those layers named. Before transformers 5.5 the KV press refuses the model as it is
    patched, naming its cache class and the release (the model would keep its own cache class, or none at all
    without one passed): 5.5 for all, OLMo Hybrid 5.15."""
    model = _hybrid(kind, layered=False)
    fixed = FIXED.get(kind, [0, 2])
    named = re.escape(f"layers {sorted(fixed + MLP_ONLY.get(kind, []))} of {CLASSES[kind]} (a hybrid model)")
    with pytest.raises(ValueError, match=named), QuickMergeInputPress(0.5, layer=0)(model):
        pass
    own = own_cache_class(base_model(model))
    layered_from = Version("5.15" if kind == "olmo-hybrid" else "5.5")
    assert (own is not None) == (Version(transformers.__version__) < layered_from)
    if own is None:
        return
    named = re.escape(f"layers {fixed} of {CLASSES[kind]} (a hybrid model) in a cache class of the model's own ({own})")
    with pytest.raises(UnsupportedCacheError, match=rf"{named}.*5\.5 or later; OLMo Hybrid: 5\.15"), \
            QuickMergePress(0.5)(model):
        pass


def test_layers_of_another_kind_are_named():
    """A hybrid model whose other layers are neither attention nor a mixer the presses know (here LFM2's
    convolutions, their module renamed) is refused with those layers named, not with a claim that the model has no
    attention."""
    if not hasattr(transformers, "Lfm2ForCausalLM"):
        pytest.skip("this transformers has no LFM2")
    model = tiny("lfm2")
    for i in (0, 2):
        layer = model.model.layers[i]
        layer.short_conv = layer.conv
        del layer.conv
    with pytest.raises(TypeError, match=r"layers \[0, 2\] of Lfm2ForCausalLM neither attend"), \
            QuickMergePress(0.5)(model):
        pass


def test_minimax_lightning_attention_is_refused_with_its_layers_named():
    """MiniMax's lightning attention sits where attention does (``self_attn``, a fused ``qkv_proj``) but its config
    declares it a linear attention, whose state the model keeps in a cache class of its own: the presses name those
    layers instead of merging a cache layer that holds none of their keys (an IndexError inside the prefill)."""
    if not hasattr(transformers, "MiniMaxForCausalLM"):
        pytest.skip("this transformers has no MiniMax")
    from tests.text.tiny import COMMON

    config = transformers.MiniMaxConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, block_size=8,
                                        layer_types=["linear_attention", "full_attention"] * 2, num_local_experts=4,
                                        num_experts_per_tok=2)
    model = transformers.MiniMaxForCausalLM(config).eval()
    for press in (QuickMergePress(0.5), QuickMergeInputPress(0.5, layer=0)):
        with pytest.raises(TypeError, match=r"layers \[0, 2\] of MiniMaxForCausalLM neither attend.*lightning"), \
                press(model):
            pass


@pytest.mark.parametrize("kind", ["lfm2", "lfm3", "granite4", "falcon-h1", "jamba", "nemotron-h", "kimi-linear"])
def test_generate_inside_the_press_decodes_as_token_by_token(kind):
    """``generate`` makes a hybrid model's cache itself (from its config): inside the press, greedy generation picks
    the tokens a prefill and one call per token pick, and the attention layers were merged."""
    model = _hybrid(kind)
    prompt = torch.randint(1, 90, (1, 24), generator=torch.Generator().manual_seed(0))
    press = QuickMergePress(0.5, window=4)
    _assert_generate_decodes_as_token_by_token(model, press, prompt, new_cache=lambda: transformers.DynamicCache(
        config=model.config))
    assert press.achieved_ratio == pytest.approx(0.5)
