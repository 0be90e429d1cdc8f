"""Multi-head latent attention (DeepSeek V2/V3, GLM-4.7-Flash, Youtu, Mistral 4, MiniCPM3; tests/text/tiny.py
``LATENT_KINDS``) beyond the family tests of tests/text/test_architectures.py: the two cache layouts transformers
has used (each head's keys and values before 5.15, the compressed latent and the shared rotated key part after),
replay scoring and ``generate`` on either, the options that split heads refused, and sparse attention (an indexer
picking the keys) refused."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import QuickMergeInputPress, QuickMergePress  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from quickmerge.text.decoder import (  # noqa: E402
    UnsupportedAttentionError,
    decoder_attention_layers,
)
from quickmerge.text.latent import caches_latent, expanded_keys  # noqa: E402
from tests.text.test_architectures import _assert_generate_decodes_as_token_by_token  # noqa: E402
from tests.text.tiny import COMMON, duplicated_cache, press_and_oracle, tiny  # noqa: E402

LATENT = dict(kv_lora_rank=32, q_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def _latent_from_515() -> bool:
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("5.15")


@pytest.mark.parametrize("kind", ["deepseek-v3", "deepseek-v2-lite"])
def test_the_cache_layout_is_told_apart_and_merged_as_it_is(kind):
    """From transformers 5.15 the cache holds one latent row per token (32 channels, and the 8 rotated ones shared by
    the heads' keys); before, each head's keys (24) and values (12). Either way the press halves it, and the keys the
    attention reads off the merged latent are its expansion."""
    model = tiny(kind, "eager")
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    attention = decoder_attention_layers(model)[0]
    cache = transformers.DynamicCache()
    with torch.no_grad(), QuickMergePress(0.5, window=4)(model):
        model(ids, **cache_kwargs(model, cache))
    layer = cache.layers[0]
    if _latent_from_515():
        assert (tuple(layer.keys.shape), tuple(layer.values.shape)) == ((2, 1, 12, 32), (2, 1, 12, 8))
        assert caches_latent(attention, layer.keys, layer.values)
        assert expanded_keys(attention, layer.keys, layer.values).shape == (2, 4, 12, 24)
    else:
        assert (tuple(layer.keys.shape), tuple(layer.values.shape)) == ((2, 4, 12, 24), (2, 4, 12, 12))
        assert not caches_latent(attention, layer.keys, layer.values)
    assert layer.log_sizes.shape == (2, 4, 1, 12)  # each query head's bias over the merged entries


@pytest.mark.parametrize("kind", ["deepseek-v3", "deepseek-v2-lite", "glm4-moe-lite"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_replay_scoring_decodes_on_the_duplicated_cache(kind, attn):
    """Replay scoring re-reads the prompt through the latent cache (each latent row scored by the most attention any
    head pays it): the layers are halved, decoding equals the duplicated-cache oracle and differs from the unmerged
    cache."""
    model = tiny(kind, attn)
    ids, cont = torch.randint(0, 97, (2, 24)), torch.randint(0, 97, (2, 3))
    with torch.no_grad():
        reference = model(torch.cat([ids, cont], 1)).logits[:, 24:]
        press, cache = QuickMergePress(0.5, window=4, scoring="replay", sinks=2), transformers.DynamicCache()
        with press(model):
            model(ids, **cache_kwargs(model, cache))
            oracle = duplicated_cache(cache)
            merged = model(cont, **cache_kwargs(model, cache)).logits
        assert torch.allclose(merged, model(cont, **cache_kwargs(model, oracle)).logits, atol=1e-5)
    assert [layer.keys.shape[2] for layer in cache.layers] == [15, 15]  # 12 merged, 3 decoded
    assert not torch.allclose(merged, reference, atol=1e-4)


@pytest.mark.parametrize("kind", ["deepseek-v3", "glm4-moe-lite"])
def test_generate_inside_the_press_decodes_as_token_by_token(kind):
    model = tiny(kind, "sdpa")
    prompt = torch.randint(1, 90, (1, 24), generator=torch.Generator().manual_seed(0))
    press = QuickMergePress(0.5, window=4)
    _assert_generate_decodes_as_token_by_token(model, press, prompt)
    assert press.achieved_ratio == pytest.approx(0.5)


@pytest.mark.parametrize("option", [dict(align=True), dict(scoring="replay", head_budgets=True),
                                    dict(scoring="replay", leverage=0.2)], ids=["align", "head-budgets", "leverage"])
def test_options_that_fit_or_split_each_heads_keys_are_refused(option):
    model = tiny("deepseek-v3", "sdpa")
    name = next(iter(k for k in option if k != "scoring"))
    with pytest.raises(UnsupportedAttentionError, match=rf"latent attention .*{name}"), QuickMergePress(0.5, **option)(
            model):
        pass


def _sparse(kind: str):
    t = transformers
    common = {**COMMON, "num_key_value_heads": COMMON["num_attention_heads"], **LATENT, "pad_token_id": 0,
              "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
              "n_group": 1, "topk_group": 1}
    name = {"glm-moe-dsa": "GlmMoeDsa", "deepseek-v3.2": "DeepseekV32"}[kind]
    if not hasattr(t, f"{name}ForCausalLM"):
        pytest.skip(f"transformers {t.__version__} has no {name}ForCausalLM")
    return getattr(t, f"{name}ForCausalLM")(getattr(t, f"{name}Config")(**common)).eval()


@pytest.mark.parametrize("kind", ["glm-moe-dsa", "deepseek-v3.2"])
@pytest.mark.parametrize("press", [lambda: QuickMergePress(0.5), lambda: QuickMergeInputPress(0.5, layer=0)],
                         ids=["kv", "input"])
def test_sparse_attention_picking_its_keys_with_an_indexer_is_refused(kind, press):
    """DeepSeek Sparse Attention (DeepSeek V3.2, GLM-5): each query reads the keys its indexer picks, from an indexer
    cache beside the latent one; refused as the press is entered, the layers named."""
    model = _sparse(kind)
    with pytest.raises(UnsupportedAttentionError, match=r"layers \[0, 1\] attend to the keys an indexer"), \
            press()(model):
        pass


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_kimi_k25_merges_a_prompt_with_an_image(attn):
    """Kimi K2.5's checkpoints' class (DeepSeek V3 under a vision tower): with an image in the prompt, ratio 0 decodes
    as the unpatched cache and 0.5 as the duplicated-cache oracle, the latent rows halved."""
    model = tiny("kimi-k2.5-vlm", attn)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 90, (2, 30), generator=g)
    ids = torch.cat([text[:, :5], torch.tensor([[94, 96, 96, 96, 96, 95]] * 2), text[:, 5:]], 1)
    image = dict(pixel_values=torch.randn(32, 3, 4, 4, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]] * 2))
    cont, n = torch.randint(1, 90, (2, 3)), ids.shape[1]
    with torch.no_grad():
        assert not torch.allclose(model(ids, **image).logits, model(ids).logits, atol=1e-4)  # the image is read
        reference, runs = press_and_oracle(model, ids, cont, image)
    for ratio, (merged, oracle, cache) in runs.items():
        assert torch.allclose(merged, oracle, atol=1e-5)
        assert [layer.keys.shape[2] for layer in cache.layers] == [n + 3 - round(ratio * n)] * 2
        assert torch.allclose(merged, reference, atol=1e-5) == (ratio == 0.0)

