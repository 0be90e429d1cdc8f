"""quickmerge.patch on timm NaFlexVit: image batches and NaFlex batches (each image at its own aspect ratio, padded
to one length, with a padding mask), exactness, restore, padding kept out, every pooling head, the refusals."""

import inspect
import warnings

import pytest
import torch

import quickmerge
from quickmerge.vision.adapters.timm_naflex import padding_from_mask

from ...conftest import tokens_on_grid

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

naflexvit = pytest.importorskip("timm.models.naflexvit")

PATCHES = 16  # the length every image of a NaFlex batch is padded to
REAL = (16, 10)  # real patches: an 8 x 8 image (a 4 x 4 grid) and a 4 x 10 one (2 x 5), padded with 6 tokens
PREFIX = 2  # a class token and a register token


def tiny(fused: bool = True, **extra) -> torch.nn.Module:
    settings = {**dict(patch_size=2, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, class_token=True,
                       reg_tokens=1, global_pool="avg", pos_embed_grid_size=(4, 4)), **extra}
    fields = naflexvit.NaFlexVitCfg.__dataclass_fields__
    missing = set(settings) - set(fields)
    if missing:
        pytest.skip(f"this timm's NaFlexVitCfg has no {sorted(missing)}")
    torch.manual_seed(0)
    model = naflexvit.NaFlexVit(naflexvit.NaFlexVitCfg(**settings), in_chans=3, num_classes=5).eval()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
    return model


def grid(h: int, w: int) -> torch.Tensor:
    """``[h * w, 2]`` (y, x) coordinates of a row-major patch grid."""
    return torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)


def naflex_batch(seed: int = 0, images: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Two images patchified and padded to :data:`PATCHES` tokens, as timm's NaFlex collator gives them."""
    g = torch.Generator().manual_seed(seed)
    images = images or (torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 4, 10, generator=g))
    patches = torch.zeros(2, PATCHES, 12)
    coord = torch.zeros(2, PATCHES, 2, dtype=torch.long)
    valid = torch.zeros(2, PATCHES, dtype=torch.bool)
    for i, image in enumerate(images):
        p, (h, w) = naflexvit.batch_patchify(image, (2, 2))
        patches[i, : h * w], coord[i, : h * w], valid[i, : h * w] = p[0], grid(h, w), True
    return {"patches": patches, "patch_coord": coord, "patch_valid": valid}


def with_garbage_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch with large random values where it is padding (what padding holds must not matter)."""
    patches = batch["patches"].clone()
    padding = ~batch["patch_valid"]
    patches[padding] = 100.0 * torch.randn(int(padding.sum()), patches.shape[-1])
    return {**batch, "patches": patches}


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("naflex", [False, True], ids=["images", "naflex"])
def test_r0_is_exact_and_unpatch_restores(naflex, fused):
    model = tiny(fused)
    inputs = naflex_batch() if naflex else torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(inputs)
        if naflex:  # the mask matters
            unmasked = model({**inputs, "patch_valid": torch.ones_like(inputs["patch_valid"])})
            assert not torch.allclose(unmasked[1], ref[1], atol=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a tested class
            handle = quickmerge.patch(model, r=0)
        assert torch.allclose(model(inputs), ref, atol=1e-6, rtol=0)
        handle.r = 3
        merged = model(inputs)
        assert handle.tokens_per_layer == [18, 15, 12] and handle.sizes.shape == (2, 9)
        assert not torch.allclose(merged, ref, atol=1e-4)
        want = [18.0, 18.0] if not naflex else [float(PREFIX + n) for n in REAL]
        assert handle.padded == naflex and handle.sizes.sum(dim=1).tolist() == want  # padding stands for no patch
    quickmerge.unpatch(model)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert "_pool" not in model.__dict__ and "forward_intermediates" not in model.__dict__
    with torch.no_grad():
        assert torch.equal(model(inputs), ref)


def test_an_unpadded_naflex_batch_merges_as_the_image_batch():
    """A NaFlex batch whose images all fill it (every patch real) gives what the image batch gives, merged too."""
    model, images = tiny(), torch.randn(2, 3, 8, 8)
    batch = naflex_batch(images=(images[:1], images[1:]))
    batch = {k: torch.cat([v[:1], naflex_batch(images=(images[1:], images[1:]))[k][:1]]) for k, v in batch.items()}
    assert batch["patch_valid"].all()
    with torch.no_grad(), quickmerge.patch(model, r=[4, 3, 3]) as handle:
        from_images = model(images)
        assert torch.allclose(model(batch), from_images, atol=1e-5, rtol=0)
        assert not handle.padded  # nothing to mask: the model's all-real mask is dropped, no padding path


SETTINGS = [
    dict(method="quickmerge"),
    dict(method="quickmerge", matching="greedy"),
    dict(method="quickmerge", similarity="keys"),
    dict(method="tome"),
    dict(method="random"),
    dict(method="pool"),
    dict(method="quickmerge", prop_attn=False, size_weighted_pool=False),
    dict(method="quickmerge", unmerge="copy"),
]


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_what_padding_holds_never_reaches_a_real_token(settings, fused):
    """Garbage in the padding leaves every output unchanged: padding is masked from every attention, never decides
    which real tokens merge, and weighs nothing in a merge or in the head's mean."""
    model, batch = tiny(fused), naflex_batch()
    handle = quickmerge.patch(model, r=[4, 3, 3], trace_source=True, seed=0, **settings)
    with torch.no_grad():
        clean, clean_tokens = model(batch), features(model, batch)
        source = handle.source.clone()
        handle.configure(seed=0)
        dirty = model(with_garbage_padding(batch))
        dirty_tokens = features(model, with_garbage_padding(batch))
    assert torch.equal(handle.source[:, : PREFIX + REAL[1]], source[:, : PREFIX + REAL[1]])  # same real merges
    assert torch.allclose(dirty, clean, atol=1e-5, rtol=0)
    real = handle.sizes > 0
    assert torch.allclose(dirty_tokens[real], clean_tokens[real], atol=1e-5, rtol=0)
    if settings["method"] != "random":  # random drops tokens (their sizes go with them)
        assert handle.sizes.sum(dim=1).tolist() == [float(PREFIX + n) for n in REAL]


def _arguments(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``forward_features``'s arguments for a NaFlex batch (timm before 1.0.2x names the first one ``x``)."""
    first = list(inspect.signature(naflexvit.NaFlexVit.forward_features).parameters)[1]  # after self
    return {first: batch["patches"], "patch_coord": batch["patch_coord"], "patch_valid": batch["patch_valid"]}


def features(model: torch.nn.Module, batch: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    """The final norm's tokens ``[B, N, C]`` (newer timm returns them in a dict with the padding mask)."""
    out = model.forward_features(**_arguments(batch), **extra)
    return out["patches"] if isinstance(out, dict) else out


def head(model: torch.nn.Module, tokens: torch.Tensor, batch: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    return model.forward_head(tokens, patch_valid=batch["patch_valid"], **extra)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize(("method", "matching", "r"), [
    ("quickmerge", "bipartite", [3, 0, 0]),  # the 3 padding tokens of the alternate set: all of them go at once
    ("tome", "bipartite", [3, 0, 0]),
    ("quickmerge", "greedy", [6, 0, 0]),  # greedy may remove every padding token at once
    ("random", "bipartite", [6, 0, 0]),
])
def test_padding_goes_first_so_the_padded_image_is_unchanged(method, matching, r, fused):
    model, batch = tiny(fused), naflex_batch()
    with torch.no_grad():
        ref = model(batch)
        ref_tokens = features(model, batch)
        with quickmerge.patch(model, r=r, method=method, matching=matching, seed=0, trace_source=True) as handle:
            out = model(batch)
            tokens = features(model, batch)
            real = handle.source[1, : PREFIX + REAL[1]]
    assert real.unique().numel() == PREFIX + REAL[1]  # every real patch of the padded image is still its own token
    assert torch.allclose(out[1], ref[1], atol=1e-5, rtol=0)
    assert torch.allclose(tokens[1, real], ref_tokens[1, : PREFIX + REAL[1]], atol=1e-5, rtol=0)
    assert not torch.allclose(out[0], ref[0], atol=1e-3)  # the full image merged


def test_merge_aware_training_refuses_a_padded_batch_and_takes_an_unpadded_one():
    model, batch = tiny(), naflex_batch()
    full = {k: v[:1] for k, v in batch.items()}  # the 8 x 8 image fills its 16 patches
    model.train()
    with quickmerge.patch(model, r=3, temperature=0.5):
        with pytest.raises(ValueError, match="padded batches"):
            model(batch)
        model(full).sum().backward()  # nothing to mask: trains as an image batch
    assert model.embeds.proj.weight.grad is not None


def test_a_key_only_padding_mask_is_replaced_as_the_symmetric_one():
    model, batch = tiny(use_key_only_attn_mask=True), naflex_batch()
    symmetric = tiny()
    with torch.no_grad():
        ref = model(batch)
        assert torch.allclose(ref, symmetric(batch), atol=1e-5, rtol=0)  # the two masks agree on real queries
        with quickmerge.patch(model, r=[4, 3, 3]) as handle, quickmerge.patch(symmetric, r=[4, 3, 3]):
            out = model(batch)
            assert handle.padded and torch.allclose(out, symmetric(batch), atol=1e-5, rtol=0)
            assert torch.allclose(model(with_garbage_padding(batch)), out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", ["avg", "avgmax", "max", "map", "token", "avg-final-norm", "avgmax-final-norm"])
@pytest.mark.parametrize("unmerge", ["residual", "copy"])
@pytest.mark.parametrize("r", [[5, 4, 3], [2, 1, 1]], ids=["padding-merged", "padding-left"])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_every_pooling_head_is_exact_when_merging_exact_duplicates(pool, unmerge, r, fused):
    # two flat regions, positions zeroed: every patch is a copy of its region's, so merging copies with proportional
    # attention changes nothing, if the head pools over the real patches (sizes), padding left out, not merged tokens.
    # "-final-norm": the final norm before the pooling (fc_norm=False), where the residual unmerge norms every patch's
    # own stream and timm's own pooling averages them
    kind, final_norm = pool.removesuffix("-final-norm"), pool.endswith("-final-norm")
    model = tiny(fused, global_pool=kind, **({"fc_norm": not final_norm} if kind.startswith("avg") else {}))
    model.reset_classifier(0)  # the pooled features (the classifier's small initial weights would hide differences)
    if kind.startswith("avg"):
        assert isinstance(model.norm, torch.nn.Identity) != final_norm
    with torch.no_grad():
        model.embeds.pos_embed.zero_()
    images = [torch.full((1, 3, 8, 8), -0.4), torch.full((1, 3, 4, 10), -0.4)]
    images[0][..., 6:, :] = 0.7  # the first image's bottom row of patches, two of the second's ten
    images[1][..., :, 8:] = 0.7
    batch = naflex_batch(images=tuple(images))
    with torch.no_grad():
        ref = model(batch)
        with quickmerge.patch(model, r=r, method="tome", unmerge=unmerge) as handle:
            assert torch.allclose(model(batch), ref, atol=1e-5, rtol=0)
            assert torch.allclose(model(with_garbage_padding(batch)), ref, atol=1e-5, rtol=0)
            assert handle.padded and handle.sizes.shape == (2, PREFIX + PATCHES - sum(r))
            assert not torch.equal(handle.sizes[0, PREFIX:].amax(), handle.sizes[0, PREFIX:].amin())
            assert (handle.sizes[1] == 0).any() == (r == [2, 1, 1])  # padding tokens left at the end, or none
            if kind in ("avg", "avgmax", "map"):  # unequal sizes: the weights matter
                handle.size_weighted_pool = False
                handle.configure(prop_attn=False)
                assert not torch.allclose(model(batch), ref, atol=1e-5, rtol=0)  # beyond the tolerance above


def test_average_pooling_with_the_copy_unmerge_is_the_size_weighted_mean_of_the_real_tokens():
    model, batch = tiny(), naflex_batch()
    with torch.no_grad(), quickmerge.patch(model, r=[4, 3, 3], unmerge="copy") as handle:
        tokens = features(model, batch)
        sizes = handle.sizes[:, PREFIX:, None]
        want = model.head(model.fc_norm((tokens[:, PREFIX:] * sizes).sum(1) / sizes.sum(1)))
        assert torch.allclose(head(model, tokens, batch), want, atol=1e-6, rtol=0)
        assert torch.allclose(model(batch), want, atol=1e-6, rtol=0)


def test_average_pooling_after_the_final_norm_reads_every_real_patch_s_own_stream():
    """The residual unmerge (default): timm's own masked mean over the real patches of each patch's residual stream
    (its token plus what it lost at each merge), normed, not the size-weighted mean of the normed merged tokens."""
    model, batch = tiny(global_pool="avg", fc_norm=False), naflex_batch()
    model.reset_classifier(0)
    seen = {}
    hook = model.norm.register_forward_hook(lambda _m, args, _out: seen.update(stream=args[0]))
    with torch.no_grad(), quickmerge.patch(model, r=[4, 3, 3]) as handle:
        pooled = model(batch)
        hook.remove()
        assert handle.kept_deviations()
        patches = model.norm(handle.expand_to_patches(seen["stream"], residual=True))[:, PREFIX:]
        real = batch["patch_valid"][..., None].float()
        assert torch.allclose(pooled, (patches * real).sum(1) / real.sum(1), atol=1e-5, rtol=0)
        tokens, sizes = model.norm(seen["stream"])[:, PREFIX:], handle.sizes[:, PREFIX:, None]
        assert not torch.allclose(pooled, (tokens * sizes).sum(1) / sizes.sum(1), atol=1e-3)


def test_feature_maps_of_an_image_batch_put_merged_tokens_back_on_the_grid():
    model, x = tiny(), torch.randn(2, 3, 8, 8)
    ref = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in ref] == [(2, 32, 4, 4)] * 3
    handle = quickmerge.patch(model, r=3, trace_source=True, unmerge="copy")
    with torch.no_grad():
        tokens = model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC")
        assert [t.shape[1] for t in tokens] == [13, 10, 7]  # NLC: each block's merged tokens, as they are
        for block in range(3):
            alone = model.forward_intermediates(x, indices=[block], stop_early=True, intermediates_only=True)
            assert torch.equal(alone[0], tokens_on_grid(tokens[block], handle.source, PREFIX, 4))


def test_refusals_before_any_work():
    """A NaFlex batch's feature maps while merging; a mask that is not a padding mask; rotary NaFlexVits."""
    model, batch = tiny(), naflex_batch()
    handle = quickmerge.patch(model, r=3)
    with torch.no_grad(), pytest.raises(ValueError, match=r"NaFlex batch .* cannot be unmerged"):
        model.forward_intermediates(batch, output_fmt="NLC")
    handle.r = 0  # nothing merges: timm's own call (timm 1.0.16 refuses NaFlex input itself)
    assert _outcome(lambda: model.forward_intermediates(batch, output_fmt="NLC", intermediates_only=True)) == \
        _outcome(lambda: type(model).forward_intermediates(model, batch, output_fmt="NLC", intermediates_only=True))
    handle.r = 3
    bias = torch.zeros(2, 1, 1, PREFIX + PATCHES)
    bias[..., 5] = -1.0  # a bias, not a padding mask: it would be lost
    with torch.no_grad(), pytest.raises(ValueError, match="values other than 0"):
        features(model, batch, attn_mask=bias)
    quickmerge.unpatch(model)
    for settings in ({"rope_type": "axial"}, {"swiglu_mlp": True}):  # rotary tables; EVA blocks without them
        if not set(settings) <= set(naflexvit.NaFlexVitCfg.__dataclass_fields__):
            continue  # a timm without them
        other = tiny(**settings)
        with pytest.raises(TypeError, match="quickmerge patches NaFlexVit with timm's standard ViT blocks"):
            quickmerge.patch(other, r=2)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in other.modules())


def _outcome(call) -> tuple:
    """What a call gave: its tensors' shapes and sums, or the type of what it raised."""
    try:
        with torch.no_grad():
            return tuple((tuple(t.shape), round(float(t.sum()), 4)) for t in call())
    except Exception as error:  # compared as an outcome
        return (type(error),)


def test_padding_from_mask_reads_timm_s_masks_and_refuses_others():
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    lowest = torch.finfo(torch.float32).min
    symmetric = torch.where(valid[:, None, :, None] & valid[:, None, None, :], 0.0, lowest)
    key_only = torch.where(valid[:, None, None, :], 0.0, lowest)
    for mask in (symmetric, key_only, key_only.expand(-1, -1, 6, -1), symmetric == 0,
                 symmetric.masked_fill(symmetric < 0, float("-inf"))):
        assert torch.equal(padding_from_mask(mask, 6, 1), valid)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match="not a padding mask"):
        padding_from_mask(causal, 6, 1)
    with pytest.raises(ValueError, match="values other than 0"):
        padding_from_mask(symmetric + 0.5, 6, 1)
    with pytest.raises(ValueError, match="shape"):
        padding_from_mask(symmetric[:, :, :3], 6, 1)
    with pytest.raises(ValueError, match="class or register token"):
        padding_from_mask(torch.where(~valid.flip(1)[:, None, None, :], lowest, 0.0), 6, 1)


def test_torch_compile_traces_image_batches_whole_and_naflex_batches_with_timm_s_own_breaks():
    """Image batches: the hooks and the pool trace into one graph (fullgraph=True) that follows the handle's settings.
    NaFlex batches: timm's own code breaks the graph (unpatched too); compiled, they give what eager gives."""
    torch._dynamo.reset()
    model, x, batch = tiny(fc_norm=False), torch.randn(2, 3, 8, 8), naflex_batch()
    whole = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), quickmerge.patch(model, r=3) as handle:
        for settings in ({"r": 3}, {"r": [4, 3, 3], "method": "tome", "unmerge": "copy"}):
            handle.configure(**settings)
            assert torch.allclose(whole(x), model(x), atol=1e-6, rtol=0)
        torch._dynamo.reset()
        broken = torch.compile(model, backend="eager")  # every block's frame compiled once: one setting only
        assert torch.allclose(broken(batch), model(batch), atol=1e-6, rtol=0)
        assert handle.padded and handle.tokens_per_layer == [18, 14, 11]
    torch._dynamo.reset()


def test_the_readme_s_naflex_vit_snippet():
    """The README's lines after loading, on a tiny NaFlexVit and timm's own NaFlex collator and patchifier: images
    of three sizes and aspect ratios, padded to one length, merged with padding first."""
    from timm.data.naflex_dataset import NaFlexCollator
    from timm.data.naflex_transforms import Patchify

    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g) for h, w in ((8, 8), (4, 10), (6, 4))]
    model = tiny()
    collate, patchify = NaFlexCollator(max_seq_len=PATCHES), Patchify(2)
    batch, _ = collate([(patchify(image), 0) for image in images])
    assert batch["patch_valid"].sum(1).tolist() == [16, 10, 6]  # two images padded
    with torch.no_grad():
        reference = model(batch)
        handle = quickmerge.patch(model, r=2)
        logits = model(batch)
    assert logits.shape == reference.shape and torch.isfinite(logits).all()
    assert handle.sizes.sum(dim=1).tolist() == [18.0, 12.0, 8.0]  # real patches + class and register tokens
    assert handle.tokens_per_layer == [18, 16, 14]


def test_entropy_calibration_leaves_the_padding_out():
    """A padded NaFlex batch calibrates as its images do alone, unpadded: padding is neither a query nor a key."""
    from quickmerge.vision.budget import block_attention_perplexity

    model, batch = tiny(), naflex_batch()
    with torch.no_grad():
        for block in model.blocks:  # sharper attention than random weights give
            block.attn.qkv.weight[:32].mul_(8.0)

    def inputs(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # NaFlexVit.forward's keywords
        return {"x": b["patches"], "patch_coord": b["patch_coord"], "patch_valid": b["patch_valid"]}

    padded = block_attention_perplexity(model, inputs(batch))
    alone = [block_attention_perplexity(model, {k: v[i : i + 1, :real] for k, v in inputs(batch).items()})
             for i, real in enumerate(REAL)]
    assert padded == pytest.approx([(a + b) / 2 for a, b in zip(*alone, strict=True)], rel=1e-5)
    assert block_attention_perplexity(model, inputs(with_garbage_padding(batch))) == pytest.approx(padded, rel=1e-5)
    assert block_attention_perplexity(model, inputs(batch), batch_size=1) == pytest.approx(padded, rel=1e-5)
