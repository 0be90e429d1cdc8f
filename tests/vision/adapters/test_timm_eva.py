"""quickmerge.patch on timm Eva, the rotary-position ViTs: exactness, restore, rotary tables merged with the tokens."""

import inspect
import warnings

import pytest
import torch

import quickmerge
from quickmerge.vision.adapters.timm_eva import _release

from ...conftest import TRACING, tokens_on_grid

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

timm = pytest.importorskip("timm")
eva = pytest.importorskip("timm.models.eva")

CONFIGS = {  # EVA-02 (absolute + rotary positions), RoPE-ViT's mixed mode, DINOv3 with registers, ...
    "eva02": {},
    "mixed": {"rope_type": "mixed", "use_abs_pos_emb": False},
    "dinov3_registers": {"rope_type": "dinov3", "use_abs_pos_emb": False, "num_reg_tokens": 2,
                         "global_pool": "token"},
    "rope_attention_gqa": {"attn_type": "rope", "num_kv_heads": 2, "qkv_fused": False},
    "attention_pooling": {"global_pool": "map"},
    "mrope": {"rope_type": "mrope"},
    "no_rope": {"use_rot_pos_emb": False},
}
PATCH, SIZE = 4, 32  # an 8 x 8 grid of patches


# before timm 1.0.20 Eva's unfused attention read attn_mask as a boolean padding mask (proportional attention refused)
OLD_MASK = _release(timm.__version__) < (1, 0, 20)


def tiny_eva(fused: bool = True, *, mask_free: bool = False, **extra) -> torch.nn.Module:
    settings = {"use_rot_pos_emb": True, **extra}
    missing = set(settings) - set(inspect.signature(eva.Eva).parameters)
    if missing:  # rope types and grouped-query attention came with later timm releases than the floor
        pytest.skip(f"timm {timm.__version__}'s Eva takes no {sorted(missing)}")
    if OLD_MASK and not fused and not mask_free:
        pytest.skip(f"timm {timm.__version__}: proportional attention is refused in Eva's unfused attention")
    try:
        model = eva.Eva(img_size=SIZE, patch_size=PATCH, embed_dim=64, depth=3, num_heads=4, num_classes=5,
                        **settings).eval()
    except ValueError as error:  # a rope type this release does not have yet (mrope before 1.0.2x)
        pytest.skip(f"timm {timm.__version__}: {error}")
    except TypeError as error:  # timm 1.0.28-1.0.29's own mrope Eva passes its rotary table a keyword it does not take
        if "RotaryEmbeddingMRope" not in str(error):  # any other TypeError here is news (a keyword renamed)
            raise
        pytest.skip(f"timm {timm.__version__} cannot build this Eva (before quickmerge is involved): {error}")
    for block in model.blocks:
        block.attn.fused_attn = fused
    torch.nn.init.normal_(model.head.weight)  # timm initialises it near zero: logits too small to compare
    return model


def sharpen(model: torch.nn.Module, factor: float = 6.0) -> None:
    """Scale queries and keys up: at timm's initial scale attention is nearly uniform and positions barely count."""
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            if attn.qkv is not None:
                attn.qkv.weight[: 2 * attn.qkv.weight.shape[0] // 3] *= factor
            else:
                attn.q_proj.weight *= factor
                attn.k_proj.weight *= factor


def pair_rotations(model: torch.nn.Module) -> None:
    """Give patches 2j and 2j + 1 (horizontal neighbours) the rotation of patch 2j."""
    original = model.rope.get_embed

    def get_embed(*args, **kwargs):
        table = original(*args, **kwargs)
        rows = table.unflatten(-2, (-1, 2))[..., :1, :]
        return rows.expand(*rows.shape[:-2], 2, rows.shape[-1]).flatten(-3, -2)

    model.rope.get_embed = get_embed


def paired_image(batch: int = 2) -> torch.Tensor:
    """Random pixels in which patches 2j and 2j + 1 are equal."""
    strips = torch.randn(batch, 3, SIZE, SIZE // (2 * PATCH), 1, PATCH)
    return strips.expand(-1, -1, -1, -1, 2, -1).reshape(batch, 3, SIZE, SIZE)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_r0_is_exact_and_unpatch_restores(name, fused):
    model, x = tiny_eva(fused, **CONFIGS[name]), torch.randn(2, 3, SIZE, SIZE)
    ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Eva is a tested class
        handle = quickmerge.patch(model, r=0)
    assert torch.equal(model(x), ref)
    handle.r = 8
    merged = model(x)
    p = model.num_prefix_tokens
    assert handle.tokens_per_layer == [64 + p, 56 + p, 48 + p]
    assert torch.isfinite(merged).all() and not torch.allclose(merged, ref, atol=1e-5)
    quickmerge.unpatch(model)
    assert torch.equal(model(x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert (model.rope is None or "get_embed" not in vars(model.rope)) and "pool" not in vars(model)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("method", ["pool", "tome", "quickmerge"])
@pytest.mark.parametrize("name", ["mixed", "dinov3_registers", "rope_attention_gqa"])
def test_merging_copies_that_share_a_rotation_is_exact(name, method, fused):
    # neighbours with equal pixels and (by construction) equal rotations are the same token: merging each pair
    # changes nothing -- if the merged token keeps the pair's rotation and proportional attention counts it twice
    model = tiny_eva(fused, **{**CONFIGS[name], "use_abs_pos_emb": False})
    sharpen(model)
    pair_rotations(model)
    x = paired_image()
    ref = model(x)
    with quickmerge.patch(model, r=[32, 0, 0], method=method) as handle:
        assert torch.allclose(model(x), ref, atol=1e-5)
        assert handle.tokens_per_layer[1] == 32 + model.num_prefix_tokens
    del model.rope.get_embed  # the patches' own rotations: merged pairs no longer sit at one position
    ref = model(x)
    with quickmerge.patch(model, r=[32, 0, 0], method="pool"):
        assert not torch.allclose(model(x), ref, atol=1e-4)


@pytest.mark.parametrize("keep_order", [False, True], ids=["shuffled", "in_order"])
@pytest.mark.parametrize("name", ["eva02", "mixed", "dinov3_registers"])
def test_each_block_gets_the_mean_of_its_tokens_patches_rotations(name, keep_order):
    model = tiny_eva(**CONFIGS[name])
    seen = []
    for block in model.blocks:
        block.attn.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs["rope"]), with_kwargs=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        full = model.rope.get_embed()  # [N0, D], or [depth, H, N0, D] in mixed mode
        with quickmerge.patch(model, r=[8, 8, 0], trace_source=True, keep_order=keep_order) as handle:
            model(x)
    table = full[2] if name == "mixed" else full[None]  # the last block's, [H or 1, N0, D]
    p = model.num_prefix_tokens
    group = handle.source[:, p:] - p  # [B, N0] final token of each patch (the last block merges none)
    onehot = torch.nn.functional.one_hot(group, 48).float()  # [B, N0, 48]
    expected = torch.einsum("bnk,hnd->bhkd", onehot, table) / onehot.sum(1)[:, None, :, None]
    assert seen[-1].shape == expected.shape and torch.allclose(seen[-1], expected, atol=1e-6)
    assert seen[0] is full or torch.equal(seen[0], table[0] if name != "mixed" else full[0])  # block 0: untouched


@pytest.mark.parametrize("name", ["eva02", "mixed", "dinov3_registers", "rope_attention_gqa"])
def test_captured_queries_and_keys_are_the_rotated_ones_the_attention_multiplies(name):
    # eager attention: the probabilities that reach attn_drop must be softmax(q k^T * scale) of what the handle
    # recorded, in every block, merged tokens included (no proportional attention, so no bias to add)
    model = tiny_eva(False, mask_free=True, **CONFIGS[name])
    sharpen(model)
    probabilities, recorded = [], []
    for block in model.blocks:
        block.attn.attn_drop.register_forward_hook(lambda _m, args, _out: probabilities.append(args[0]))
    handle = quickmerge.patch(model, r=8, prop_attn=False)
    record = handle.record_qk

    def spy(q=None, k=None, scale=None):
        recorded.append(q if q is not None else k)
        record(q=q, k=k, scale=scale)

    handle.record_qk = spy
    with torch.no_grad():
        model(torch.randn(2, 3, SIZE, SIZE))
    assert len(recorded) == 2 * len(probabilities) == 6
    for i, attention in enumerate(probabilities):
        q, k = recorded[2 * i: 2 * i + 2]
        expected = (q * model.blocks[i].attn.scale @ k.transpose(-2, -1)).softmax(-1)
        assert torch.allclose(attention, expected, atol=1e-5), i


def test_attention_pooling_reads_the_prefix_and_weights_by_size():
    model = tiny_eva(**CONFIGS["attention_pooling"])
    x = torch.randn(2, 3, SIZE, SIZE)
    seen = []
    model.attn_pool.register_forward_pre_hook(lambda _m, args, kwargs: seen.append((args[0].shape, kwargs)),
                                              with_kwargs=True)
    with quickmerge.patch(model, r=8) as handle:
        model(x)
    (shape, kwargs), = seen
    assert shape[1] == 40 + model.num_prefix_tokens  # class token included, as Eva's own pooling has it
    assert torch.allclose(kwargs["attn_mask"].exp().flatten(1), handle.sizes)


def test_half_precision_and_gradients():
    model = tiny_eva(**CONFIGS["dinov3_registers"]).to(torch.bfloat16)
    with quickmerge.patch(model, r=8):
        y = model(torch.randn(2, 3, SIZE, SIZE, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    model = tiny_eva(**CONFIGS["eva02"]).train()
    x = torch.randn(2, 3, SIZE, SIZE, requires_grad=True)
    with quickmerge.patch(model, r=8, temperature=0.5):
        model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_feature_maps_put_each_blocks_merged_tokens_back_on_the_grid():
    model = tiny_eva(**CONFIGS["dinov3_registers"])
    x = torch.randn(2, 3, SIZE, SIZE)
    side = SIZE // PATCH
    with torch.no_grad(), quickmerge.patch(model, r=8, trace_source=True, unmerge="copy") as handle:
        tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert [t.shape[1] for t in tokens] == [56, 48, 40]
        maps = model.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
        for block in range(3):
            alone = model.forward_intermediates(x, indices=[block], stop_early=True, intermediates_only=True)
            want = tokens_on_grid(tokens[block], handle.source, 3, side)
            assert torch.equal(alone[0], want) and torch.equal(maps[block], want)
        handle.r = 0
        assert model.forward_intermediates(x, output_fmt="NCHW")[1][0].shape == (2, 64, side, side)


def test_post_norm_blocks_are_refused():
    try:
        model = tiny_eva(use_post_norm=True)
    except TypeError as error:  # timm 1.0.20 passes EvaBlockPostNorm an argument it does not take
        pytest.skip(f"timm {timm.__version__} cannot build a post-norm Eva: {error}")
    with pytest.raises(TypeError, match="post-norm"):
        quickmerge.patch(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_blocks_taking_no_rotary_table_are_refused_untouched():
    model = tiny_eva()
    model.blocks[2].forward = lambda x, rotary=None, attn_mask=None: x  # a release that renamed the argument
    with pytest.raises(TypeError, match=r"block 2 \(EvaBlock\) takes no 'rope'"):
        quickmerge.patch(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_attention_that_rotates_other_tokens_is_refused_untouched():
    model = tiny_eva()
    model.blocks[1].attn.num_prefix_tokens = 0
    with pytest.raises(TypeError, match="block 1's attention leaves 0 tokens unrotated"):
        quickmerge.patch(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.skipif(not OLD_MASK, reason="timm >= 1.0.20 adds a float attn_mask in Eva's unfused attention too")
def test_old_timm_refuses_proportional_attention_in_unfused_eva_attention():
    model = tiny_eva(True)
    x = torch.randn(1, 3, SIZE, SIZE)
    with quickmerge.patch(model, r=8) as handle:
        model(x)  # fused: SDPA adds the float mask
        for block in model.blocks:
            block.attn.fused_attn = False
        with pytest.raises(ValueError, match="boolean padding mask"):
            model(x)
        handle.prop_attn = False
        model(x)


@pytest.mark.parametrize("name", ["vit_small_patch16_rope_mixed_224", "vit_small_patch16_dinov3",
                                  "eva02_tiny_patch14_224"])
def test_the_readme_s_rotary_models_patch_whole(name):
    # the README's snippet loads RoPE-ViT with pretrained weights (none offline): the same architectures, random
    try:
        model = timm.create_model(name, pretrained=False).eval()
    except RuntimeError as error:  # a timm release before the model was added
        pytest.skip(str(error))
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        ref = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            handle = quickmerge.patch(model, r=8)
        model(x)
        grid = (x.shape[-1] // model.patch_embed.patch_size[0]) ** 2
        p, depth = model.num_prefix_tokens, len(model.blocks)
        assert handle.tokens_per_layer == [grid + p - 8 * i for i in range(depth)]
        handle.r = 0
        assert torch.equal(model(x), ref)


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # signatures read when hooked
def test_torch_compile_traces_the_rotary_hooks_whole():
    model = tiny_eva(**CONFIGS["mixed"])
    x = torch.randn(2, 3, SIZE, SIZE)
    handle = quickmerge.patch(model, r=8)
    compiled = torch.compile(model, backend=TRACING, fullgraph=True)  # a graph break (an untraceable hook) raises
    assert torch.allclose(compiled(x), model(x), atol=1e-5) and handle.tokens_per_layer == [65, 57, 49]
    handle.r = 0
    assert torch.allclose(compiled(x), model(x), atol=1e-5) and handle.tokens_per_layer == [65, 65, 65]


def test_a_table_that_is_not_one_row_per_patch_is_refused_by_name():
    model = tiny_eva()
    errors = []

    def ask(_m, _args):  # in block 1, after block 0 merged: a table of the wrong length, and one with too many dims
        for table in (torch.zeros(5, 32), torch.zeros(1, 1, 1, 64, 32)):
            with pytest.raises(ValueError, match=r"a per-patch table must be \[\.\.\., 64, D\]") as caught:
                handle.mean_over_patches(table)
            errors.append(caught.value)

    model.blocks[1].register_forward_pre_hook(ask)
    with quickmerge.patch(model, r=8) as handle:
        model(torch.randn(1, 3, SIZE, SIZE))
    assert len(errors) == 2
