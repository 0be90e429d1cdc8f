"""quickmerge.patch on timm VisionTransformer: exactness, restore, token counts, proportional attention."""

import inspect
import warnings

import pytest
import torch

import quickmerge

from ...conftest import alive_after_call, tokens_on_grid

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

timm_vit = pytest.importorskip("timm.models.vision_transformer")

CONFIGS = {
    "plain": {},
    "layerscale_qknorm": {"init_values": 0.1, "qk_norm": True},
    "registers": {"reg_tokens": 2},
    "no_class_token_avgpool": {"class_token": False, "global_pool": "avg"},
}


def tiny_vit(fused: bool, **extra) -> torch.nn.Module:
    model = timm_vit.VisionTransformer(img_size=16, patch_size=2, in_chans=1, num_classes=5, embed_dim=32, depth=3,
                                       num_heads=4, mlp_ratio=2.0, **extra).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_r0_is_exact_and_unpatch_restores(name, fused):
    model, x = tiny_vit(fused, **CONFIGS[name]), torch.randn(2, 1, 16, 16)
    ref = model(x)
    handle = quickmerge.patch(model, r=0)
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=0)
    handle.configure(ratio=1.0)
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=0)
    handle.r = 10
    merged = model(x)
    assert not torch.allclose(merged, ref, atol=1e-5)
    quickmerge.unpatch(model)
    assert torch.equal(model(x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("pool", ["avg", "avgmax", "map"])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_average_pooling_weights_tokens_by_size_and_stays_exact_on_duplicates(pool, fused):
    # two flat regions, positions zeroed: every token is a copy of its region's, so merging copies with
    # proportional attention changes nothing, if the head averages over patches (sizes), not merged tokens
    model = tiny_vit(fused, class_token=False, global_pool=pool)
    if model.attn_pool is not None:
        model.attn_pool.fused_attn = fused
    with torch.no_grad():
        model.pos_embed.zero_()
    x = torch.full((2, 1, 16, 16), -0.4)
    x[:, :, :, 12:] = 0.7  # a quarter of the patches: merging leaves the regions' token counts unequal

    def pooled():  # the head's features before the classifier
        return model.forward_head(model.forward_features(x), pre_logits=True)

    ref = pooled()
    with quickmerge.patch(model, r=[16, 12, 8], method="tome") as handle:
        assert torch.allclose(pooled(), ref, atol=1e-5)
        assert handle.sizes is not None and handle.sizes.shape == (2, 28)
        assert not torch.equal(handle.sizes[:, :1].expand(2, 28), handle.sizes)  # unequal sizes: weights matter
        handle.size_weighted_pool = False
        assert not torch.allclose(pooled(), ref, atol=1e-3)


def test_average_pooling_is_the_size_weighted_mean_of_the_output_tokens():
    model, x = tiny_vit(True, reg_tokens=1, global_pool="avg"), torch.randn(3, 1, 16, 16)
    with quickmerge.patch(model, r=10) as handle:
        tokens = model.forward_features(x)
        sizes = handle.sizes[:, 2:, None]  # after the class and register tokens
        want = model.head(model.fc_norm((tokens[:, 2:] * sizes).sum(1) / sizes.sum(1)))
        assert torch.allclose(model.forward_head(tokens), want, atol=1e-6)
        assert torch.allclose(model(x), want, atol=1e-6)
        other = model.forward_features(torch.randn(3, 1, 16, 16))  # same shape, other sizes
        plain = model.head(model.fc_norm(tokens[:, 2:].mean(1)))
        assert torch.allclose(model.forward_head(tokens), plain, atol=1e-6)  # not the last pass's: timm's own
        assert torch.allclose(model.forward_head(other), model.head(model.fc_norm(
            (other[:, 2:] * handle.sizes[:, 2:, None]).sum(1) / handle.sizes[:, 2:, None].sum(1))), atol=1e-6)
        handle.size_weighted_pool = False
        model(x)
        assert torch.allclose(model(x), plain, atol=1e-6)
    assert "pool" not in model.__dict__


def test_deit_distilled_keeps_both_tokens_and_is_exact_at_r0():
    from timm.models.deit import VisionTransformerDistilled

    model = VisionTransformerDistilled(img_size=16, patch_size=2, in_chans=1, num_classes=5, embed_dim=32, depth=3,
                                       num_heads=4, mlp_ratio=2.0).eval()
    x = torch.randn(2, 1, 16, 16)
    ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tested class
        handle = quickmerge.patch(model, r=0, trace_source=True)
    assert torch.allclose(model(x), ref, atol=1e-5, rtol=0)
    handle.r = 8
    assert not torch.allclose(model(x), ref, atol=1e-5)
    assert handle.tokens_per_layer == [66, 58, 50]
    assert torch.equal(handle.source[:, :2], torch.tensor([[0, 1], [0, 1]]))  # class and distillation tokens alone
    assert (handle.source[:, 2:] >= 2).all()
    quickmerge.unpatch(model)
    assert torch.equal(model(x), ref)


def test_feature_maps_put_each_blocks_merged_tokens_back_on_the_grid():
    # timm reshapes each block's patch tokens onto the grid, which merged tokens no longer fill: while merging, each
    # block's tokens are unmerged first, every patch carrying the token it was merged into by that block
    model, x = tiny_vit(True, reg_tokens=1), torch.randn(2, 1, 16, 16)
    ref = model.forward_intermediates(x, intermediates_only=True)
    assert [tuple(f.shape) for f in ref] == [(2, 32, 8, 8)] * 3
    handle = quickmerge.patch(model, r=0, trace_source=True, unmerge="copy")  # the residual unmerge: below
    for got, want in zip(model.forward_intermediates(x, intermediates_only=True), ref, strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
    handle.r = 8
    tokens = model.get_intermediate_layers(x, n=3)  # NLC: each block's merged tokens, as they are
    assert [t.shape[1] for t in tokens] == [56, 48, 40] and handle.tokens_per_layer == [66, 58, 50]
    maps = model.forward_intermediates(x, intermediates_only=True)
    sources = []
    for block in range(3):
        # stop_early ends the pass at that block, so the source map is the one after it
        alone = model.forward_intermediates(x, indices=[block], stop_early=True, intermediates_only=True)
        assert handle.tokens_per_layer == [66, 58, 50][:block + 1]
        sources.append(handle.source)
        want = tokens_on_grid(tokens[block], handle.source, 2, 8)
        assert torch.equal(alone[0], want) and torch.equal(maps[block], want)
    assert not torch.equal(sources[0], sources[1])
    final, pairs = model.forward_intermediates(x, indices=2, return_prefix_tokens=True, norm=True)
    assert torch.allclose(final, model.forward_features(x), atol=1e-6, rtol=0)  # the final tokens stay merged
    for (got, prefix), block in zip(pairs, (1, 2), strict=True):
        assert torch.allclose(got, tokens_on_grid(model.norm(tokens[block]), sources[block], 2, 8), atol=1e-6, rtol=0)
        assert prefix.shape == (2, 2, 32)
    if "output_dict" in inspect.signature(model.forward_intermediates).parameters:
        out = model.forward_intermediates(x, output_dict=True, return_prefix_tokens=True)
        assert all(torch.equal(a, b) for a, b in zip(out["image_intermediates"], maps, strict=True))
        assert [p.shape for p in out["image_intermediates_prefix"]] == [(2, 2, 32)] * 3
    maps2 = model.get_intermediate_layers(x, n=2, reshape=True)
    assert torch.equal(maps2[0], maps[1]) and torch.equal(maps2[1], maps[2])
    quickmerge.unpatch(model)
    assert "forward_intermediates" not in model.__dict__
    for got, want in zip(model.forward_intermediates(x, intermediates_only=True), ref, strict=True):
        assert torch.equal(got, want)


def test_features_only_models_merge_through_the_wrapped_vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch16_224", pretrained=False, features_only=True, out_indices=(1, 2),
                              img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with pytest.raises(TypeError, match=r"the model it wraps is supported: quickmerge\.patch\(model\.model\)"):
            quickmerge.patch(model, r=8)
        with quickmerge.patch(model.model, r=8, unmerge="copy") as handle:
            maps = model(x)
            assert handle.tokens_per_layer == [65, 57, 49]
            assert [tuple(m.shape) for m in maps] == [tuple(r.shape) for r in ref] == [(2, 32, 8, 8)] * 2
            assert not torch.allclose(maps[1], ref[1], atol=1e-3)
            # an unmerge: each map holds as many distinct patch vectors as the block left tokens
            assert [len(torch.unique(m[0].flatten(1).T, dim=0)) for m in maps] == [48, 40]
        assert all(torch.equal(a, b) for a, b in zip(model(x), ref, strict=True))


@pytest.mark.parametrize("method", ["quickmerge", "tome", "random", "pool"])
def test_tokens_per_layer_follow_the_schedule_and_prefix_tokens_stay(method):
    model, x = tiny_vit(True, reg_tokens=2), torch.randn(3, 1, 16, 16)
    with quickmerge.patch(model, r=[10, 5, 30], method=method, trace_source=True) as handle:
        model(x)
        p = handle.num_prefix_tokens
        assert p == 3
        assert handle.tokens_per_layer == [67, 57, 52]
        final = 52 - (24 if method in ("tome", "quickmerge") else 30)  # bipartite: at most half of 49
        source = handle.source
        assert torch.equal(source[:, :p], torch.arange(p).expand(3, p))  # prefix tokens stay in place
        kept = source[:, p:]
        assert kept.max() == final - 1 and (kept[kept >= 0] >= p).all()  # no patch joined a prefix token
        if method == "random":
            assert ((kept == -1).sum(1) == 64 - (final - p)).all()
            assert torch.allclose(handle.sizes[:, p:].sum(1), torch.full((3,), float(final - p)))
        else:
            assert (kept >= 0).all() and torch.allclose(handle.sizes.sum(1), torch.full((3,), 67.0))


@pytest.mark.parametrize("method", ["quickmerge", "tome", "random", "pool"])
def test_keep_order_keeps_the_tokens_in_patch_order_and_only_permutes_a_merge(method):
    model, x = tiny_vit(True, reg_tokens=2), torch.randn(3, 1, 16, 16)
    p = 3
    with quickmerge.patch(model, r=[10, 0, 0], method=method, trace_source=True) as handle:

        def run():
            handle.configure(seed=0)  # random dropping draws the same tokens each pass
            out = model(x)
            handle.configure(seed=0)
            return out, model.forward_features(x), handle.source

        ref, ref_tokens, ref_source = run()
        handle.keep_order = True
        out, tokens, source = run()
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)  # the blocks after the merge treat tokens alike
        assert torch.allclose(tokens[:, :p], ref_tokens[:, :p], atol=1e-5, rtol=0)
        for b in range(3):  # the same groups, numbered by their first patch
            first = torch.full((tokens.shape[1] - p,), 64).scatter_reduce(
                0, (source[b, p:] - p).clamp_min(0), torch.arange(64).masked_fill(source[b, p:] < 0, 64), "amin")
            assert (first.diff() > 0).all()
            pairs = {(int(a), int(c)) for a, c in zip(source[b, p:], ref_source[b, p:], strict=True) if a >= 0}
            assert len({a for a, _ in pairs}) == len(pairs) == len({c for _, c in pairs})  # a bijection of groups
            for a, c in pairs:
                assert torch.allclose(tokens[b, a], ref_tokens[b, c], atol=1e-5, rtol=0)
        if method in ("quickmerge", "tome"):  # bipartite matching shuffles the order, which keep_order undoes
            assert not torch.equal(source, ref_source)
            handle.r, handle.keep_order = [10, 5, 5], False
            shuffled = model(x)
            handle.keep_order = True
            assert not torch.allclose(model(x), shuffled, atol=1e-4)  # later blocks pair other tokens
        else:  # these keep the order already
            assert torch.equal(source, ref_source)


def test_keep_order_trains_through_the_differentiable_merge():
    model, x = tiny_vit(True), torch.randn(3, 1, 16, 16)
    with quickmerge.patch(model, r=[10, 0, 0], temperature=0.5, seed=1, trace_source=True) as handle:
        model.train()
        ref, shuffled = model(x), handle.source
        handle.keep_order = True
        handle.generator.manual_seed(1)
        out = model(x)
        assert torch.allclose(out, ref, atol=1e-5, rtol=0)
        for row in handle.source[:, 1:] - 1:  # each merged token where its first patch was
            assert (torch.full((54,), 64).scatter_reduce(0, row, torch.arange(64), "amin").diff() > 0).all()
        assert not torch.equal(handle.source, shuffled)
        out.sum().backward()
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_quickmerge_without_saliency_is_tome_and_with_saliency_differs():
    model, x = tiny_vit(True), torch.randn(4, 1, 16, 16)
    with quickmerge.patch(model, r=12, method="tome"):
        tome = model(x)
    with quickmerge.patch(model, r=12, saliency_weight=0.0, similarity="keys"):
        assert torch.allclose(model(x), tome, atol=1e-6)
    with quickmerge.patch(model, r=12, saliency_weight=1.0, similarity="keys"):
        assert not torch.allclose(model(x), tome, atol=1e-4)
    with quickmerge.patch(model, r=12, saliency_weight=0.0):  # the default similarity: the residual stream
        assert not torch.allclose(model(x), tome, atol=1e-6)
    with quickmerge.patch(model, r=12, matching="greedy", trace_source=True) as handle:
        model(x)
        assert handle.tokens_per_layer == [65, 53, 41]


def test_the_scaled_saliency_rule_runs_with_every_matching_and_is_refused_with_a_learned_saliency():
    model, x = tiny_vit(True), torch.randn(4, 1, 16, 16)
    with quickmerge.patch(model, r=12, method="tome"):
        tome = model(x)
    keys = {"similarity": "keys"}  # as ToMe-style compares, so that weight 0 gives its merges
    with quickmerge.patch(model, r=12, saliency_rule="scaled", saliency_weight=0.0, **keys):
        assert torch.allclose(model(x), tome, atol=1e-6)  # weight 0: ToMe-style's matching
    with quickmerge.patch(model, r=12, saliency_rule="additive", saliency_weight=4.0, **keys):
        additive = model(x)
    with quickmerge.patch(model, r=12, saliency_rule="scaled", saliency_weight=4.0, **keys):
        scaled = model(x)
        assert not torch.allclose(scaled, tome, atol=1e-4) and not torch.allclose(scaled, additive, atol=1e-4)
    greedy = {"matching": "greedy", "r": 20, **keys}
    with quickmerge.patch(model, saliency_rule="additive", saliency_weight=0.0, **greedy):
        plain = model(x)
    with quickmerge.patch(model, saliency_rule="scaled", saliency_weight=0.0, **greedy) as handle:
        assert torch.allclose(model(x), plain, atol=1e-6)  # weight 0: cosine order, as the additive rule's
        assert handle.tokens_per_layer[1] == handle.tokens_per_layer[0] - 20  # past bipartite's cap of 16
        handle.saliency_weight = 4.0
        assert not torch.allclose(model(x), plain, atol=1e-4)
    with quickmerge.patch(model, r=12, saliency_rule="scaled", saliency_weight=4.0, temperature=0.5, **keys):
        with torch.no_grad():
            assert torch.allclose(model(x), scaled, atol=1e-6)  # evaluation stays the hard merge
        model.train()
        model(x).sum().backward()  # the differentiable merge with scaled edge costs
        model.eval()
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
        # attention so sharp that some probabilities underflow to exactly 0: the saliency's entropy would give NaN
        # gradients if the costs were differentiated through it (they are not: a statistic, as the rank is)
        model.zero_grad()
        with torch.no_grad():
            for block in model.blocks:
                block.attn.qkv.weight.mul_(40.0)
        model.train()
        model(x).sum().backward()
        model.eval()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    scorer = quickmerge.vision.TokenScorer(len(model.blocks), model.embed_dim)
    with pytest.raises(ValueError, match="additive rule"):
        quickmerge.patch(model, r=12, saliency_rule="scaled", scorer=scorer)
    with quickmerge.patch(model, r=12, scorer=scorer) as handle, pytest.raises(ValueError, match="additive rule"):
        handle.configure(saliency_rule="scaled")  # refused when set, before any forward pass
    assert quickmerge.vision.get_handle(model) is None  # nothing left patched by the refusals


def test_hidden_similarity_matches_the_residual_stream_as_tomes_bipartite_rule_would():
    from quickmerge.baselines.tome import bipartite_round

    model, x = tiny_vit(True), torch.randn(3, 1, 16, 16)
    with quickmerge.patch(model, r=[12, 0, 0], similarity="hidden", saliency_weight=0.0, trace_source=True) as handle:
        seen = []
        merge = handle.merge
        handle.merge = lambda layer, h: (seen.append(h.clone()) if layer == 0 else None, merge(layer, h))[1]
        out = model(x)
        expected = bipartite_round(seen[0][:, 1:], 12)  # the tokens entering block 0's merge, class token aside
        assert torch.equal(handle.source[:, 1:] - 1, expected)  # merged only in block 0: the source map is its dst
    with quickmerge.patch(model, r=[12, 0, 0], saliency_weight=0.0, similarity="keys", trace_source=True) as handle:
        assert not torch.allclose(model(x), out, atol=1e-4)  # the keys' matching merges other pairs
        assert not torch.equal(handle.source[:, 1:] - 1, expected)


def test_proportional_attention_makes_merging_duplicates_exact():
    # zero position embeddings and a constant image: all patch tokens are identical at every layer,
    # so merging them changes nothing -- if the merged token's attention is scaled by its size.
    model = tiny_vit(True)
    with torch.no_grad():
        model.pos_embed.zero_()
    x = torch.full((2, 1, 16, 16), 0.3)
    ref = model(x)
    with quickmerge.patch(model, r=20, method="pool") as handle:
        assert torch.allclose(model(x), ref, atol=1e-5)
        handle.prop_attn = False
        assert not torch.allclose(model(x), ref, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("settings, tokens", [
    ({"r": 8}, [65, 57, 49]),
    ({"r": 8, "epsilon": 0.1}, [65, 57, 49]),
    ({"r": [40, 10, 5], "matching": "greedy"}, [65, 25, 15]),  # past the bipartite cap in the first block
    ({"r": 8, "method": "tome"}, [65, 57, 49]),
    ({"r": 8, "method": "random"}, [65, 57, 49]),
    ({"r": 8, "method": "pool"}, [65, 57, 49]),
], ids=["quickmerge", "merge-mass", "greedy", "tome", "random", "pool"])
def test_half_precision_runs(dtype, fused, settings, tokens):
    model = tiny_vit(fused).to(dtype)
    with quickmerge.patch(model, **settings) as handle:
        y = model(torch.randn(2, 1, 16, 16, dtype=dtype))
    assert y.dtype == dtype and torch.isfinite(y.float()).all() and handle.tokens_per_layer == tokens


def test_gradients_flow_through_merging():
    model = tiny_vit(True).train()
    x = torch.randn(2, 1, 16, 16, requires_grad=True)
    with quickmerge.patch(model, r=10):
        model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_errors():
    model = tiny_vit(True)
    with pytest.raises(TypeError, match="supports"):
        quickmerge.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not patched"):
        quickmerge.unpatch(model)
    with pytest.raises(ValueError, match="method"):
        quickmerge.patch(model, method="nope")
    assert quickmerge.vision.get_handle(model) is None, "a failed patch left hooks behind"
    with pytest.raises(ValueError, match="r"):
        quickmerge.patch(model, r=[1, 2])
    handle = quickmerge.patch(model, r=4)
    with pytest.raises(TypeError, match="already patched"):
        quickmerge.patch(model)
    with pytest.raises(ValueError, match="ratio"):
        handle.ratio = 1.5
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 1, 16, 16), attn_mask=torch.zeros(1, 1, 65, 65))
    handle.remove()


def test_unsupported_subclass_warns():
    class MyViT(timm_vit.VisionTransformer):
        pass

    model = MyViT(img_size=8, patch_size=2, in_chans=1, num_classes=2, embed_dim=16, depth=1, num_heads=2)
    with pytest.warns(UserWarning, match="not among the 2 tested classes") as caught:
        quickmerge.patch(model, r=2).remove()
    message = str(caught[0].message)
    assert "MyViT subclasses VisionTransformer, a tested class" in message, message
    assert "supported_families()" in message and len(message) < 400, message


def test_nothing_to_patch_raises():
    model = timm_vit.VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=2, embed_dim=16, depth=0,
                                       num_heads=2)
    with pytest.raises(TypeError, match="no timm Block"):
        quickmerge.patch(model, r=2)
    assert quickmerge.vision.get_handle(model) is None


def test_an_attention_without_attn_mask_is_refused_when_patching():
    # timm before 1.0.16: Attention.forward(x) alone; proportional attention would fail mid-forward
    class OldAttention(timm_vit.Attention):
        def forward(self, x):
            return super().forward(x)

    model = tiny_vit(True)
    for block in model.blocks:
        old = OldAttention(32, num_heads=4, qkv_bias=True)
        old.load_state_dict(block.attn.state_dict())
        block.attn = old
    with pytest.raises(TypeError, match=r"takes no attn_mask.*timm >= 1\.0\.16"):
        quickmerge.patch(model, r=2)
    assert quickmerge.vision.get_handle(model) is None


@pytest.mark.parametrize(
    "name,value,error",
    [
        ("method", "nope", ValueError),
        ("saliency", "everything", ValueError),
        ("saliency_queries", 0, ValueError),
        ("saliency_queries", 2.0, TypeError),
        ("matching", "hungarian", ValueError),
        ("saliency_weight", -1.0, ValueError),
        ("saliency_weight", "0.5", TypeError),
        ("saliency_rule", "product", ValueError),
        ("similarity", "values", ValueError),
        ("epsilon", 0.0, ValueError),
        ("epsilon", 1.5, ValueError),
        ("prop_attn", 1, TypeError),
        ("trace_source", "yes", TypeError),
        ("keep_order", 1, TypeError),
    ],
)
def test_every_setting_is_validated_when_assigned(name, value, error):
    model = tiny_vit(True)
    with quickmerge.patch(model, r=4) as handle:
        before = getattr(handle, name)
        with pytest.raises(error, match=name.split("_")[0]):
            setattr(handle, name, value)
        assert getattr(handle, name) == before  # nothing half-set
        with pytest.raises(error):
            handle.configure(**{name: value})
        with pytest.raises(TypeError, match="unknown setting"):
            handle.configure(colour="red")


def test_saliency_queries_count_for_the_queries_saliency_only():
    """With a class token and ``saliency="cls"`` the count changes nothing; with ``"queries"`` it does, and every
    count at or above the token count asks every token."""
    model, x = tiny_vit(True), torch.randn(2, 1, 16, 16)
    out = {}
    for source in ("cls", "queries"):
        for count in (1, 65, 1000):  # 64 patches + the class token
            with quickmerge.patch(model, r=12, saliency=source, saliency_queries=count, saliency_rule="additive",
                                  similarity="keys") as handle:  # the rule on which saliency weighs most here
                assert handle.saliency_queries == count
                out[source, count] = model(x)
    assert torch.equal(out["cls", 1], out["cls", 65]) and torch.equal(out["cls", 1], out["cls", 1000])
    assert torch.equal(out["queries", 65], out["queries", 1000])
    assert not torch.allclose(out["queries", 1], out["queries", 65])


def test_register_tokens_without_class_token_do_not_stand_in_for_one():
    """The first register token's query is not a class token: saliency comes from spread queries instead."""
    model, x = tiny_vit(True, reg_tokens=2, class_token=False, global_pool="avg"), torch.randn(2, 1, 16, 16)
    with quickmerge.patch(model, r=10, saliency="cls") as handle:
        assert not handle.has_class_token and handle.num_prefix_tokens == 2
        asked_cls = model(x)
    with quickmerge.patch(model, r=10, saliency="queries"):
        asked_queries = model(x)
    assert torch.equal(asked_cls, asked_queries)
    with quickmerge.patch(tiny_vit(True, reg_tokens=2), r=10) as handle:
        assert handle.has_class_token


def test_gradient_checkpointing_refuses_to_train_but_infers():
    model, x = tiny_vit(True), torch.randn(2, 1, 16, 16)
    reference = quickmerge.patch(model, r=8)
    with torch.no_grad():
        expected = model(x)
    reference.remove()
    model.set_grad_checkpointing(True)
    with quickmerge.patch(model, r=8):
        with torch.no_grad():
            assert torch.allclose(model(x), expected, atol=1e-6)
        model.train()
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            model(x).sum().backward()
    model.eval()


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_torch_compile_traces_the_hooks_whole_and_follows_the_handle(fused):
    """fullgraph=True: the merge hooks trace into one graph (no graph break); changing the handle's settings or
    unpatching recompiles instead of replaying a stale graph."""
    torch._dynamo.reset()
    model, x = tiny_vit(fused), torch.randn(4, 1, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), quickmerge.patch(model, r=8) as handle:
        for settings in ({"r": 8}, {"r": 4}, {"r": [20, 10, 5], "matching": "greedy"}, {"method": "tome"},
                         {"keep_order": True}, {"prop_attn": False}):
            handle.configure(**settings)
            y, tokens = compiled(x), list(handle.tokens_per_layer)
            assert torch.allclose(y, model(x), atol=1e-6) and tokens == handle.tokens_per_layer
    with torch.no_grad():  # unpatched: the compiled model no longer merges
        unpatched = tiny_vit(fused)
        unpatched.load_state_dict(model.state_dict())
        assert torch.allclose(compiled(x), unpatched(x), atol=1e-6)
    torch._dynamo.reset()


def test_inductor_compiles_the_patched_model_whole():
    """What users run: torch.compile's default backend (inductor, C++ code on the CPU) on a patched model; the other
    compile tests trace through ``TRACING``, without code generation."""
    torch._dynamo.reset()
    model, x = tiny_vit(True), torch.randn(2, 1, 16, 16)
    with torch.no_grad(), quickmerge.patch(model, r=8, method="tome") as handle:  # no near-ties to flip
        eager, tokens = model(x), list(handle.tokens_per_layer)
        compiled = torch.compile(model, fullgraph=True)(x)
    with torch.no_grad():
        unmerged = model(x)  # unpatched: merging changed the answer, so the compiled graph did merge
    assert handle.tokens_per_layer == tokens and tokens[-1] < tokens[0]
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=0) and not torch.allclose(unmerged, eager, atol=1e-3)
    torch._dynamo.reset()


def test_average_pooling_after_the_final_norm_compiles_whole_under_either_unmerge():
    """The pool reading each patch's own stream (a dense-head reader opened by a pre-hook on the model, closed
    after) traces into one graph; switching the unmerge or unpatching recompiles."""
    torch._dynamo.reset()
    model, x = tiny_vit(True, init_values=0.1, reg_tokens=1), torch.randn(2, 1, 16, 16)
    model.reset_classifier(5, global_pool="avg")  # the final norm stays before the pool
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        ref = model(x)
        with quickmerge.patch(model, r=8, method="tome") as handle:
            outputs = {}
            for unmerge in ("residual", "copy"):
                handle.unmerge = unmerge
                outputs[unmerge] = model(x)
                assert torch.allclose(compiled(x), outputs[unmerge], atol=1e-6, rtol=0)
            assert not torch.allclose(outputs["residual"], outputs["copy"], atol=1e-3)
        assert torch.allclose(compiled(x), ref, atol=1e-6, rtol=0)
    torch._dynamo.reset()


def test_matching_defaults_are_patchs_own_and_only_other_options_are_named():
    import inspect

    from quickmerge.vision.patch import MATCHING_DEFAULTS, non_default_matching

    parameters = inspect.signature(quickmerge.patch).parameters
    assert {k: parameters[k].default for k in MATCHING_DEFAULTS if k != "saliency_rule"} == \
        {k: v for k, v in MATCHING_DEFAULTS.items() if k != "saliency_rule"}
    assert parameters["saliency_rule"].default is None  # the default rule, or a learned scorer's additive one
    model = tiny_vit(True)
    with quickmerge.patch(model, r=4) as handle:
        assert {k: getattr(handle, k) for k in ("similarity", "saliency_rule", "saliency_weight")} == \
            {"similarity": "hidden", "saliency_rule": "scaled", "saliency_weight": 0.125}
    assert MATCHING_DEFAULTS["similarity"] == "hidden" and MATCHING_DEFAULTS["saliency_rule"] == "scaled"
    chosen = {"similarity": "hidden", "saliency_rule": "additive", "saliency_weight": None, "method": "tome"}
    assert non_default_matching(chosen) == {"saliency_rule": "additive"}  # other keys and defaults are not options
    assert non_default_matching({"saliency_weight": 0.25}) == {"saliency_weight": 0.25}
    assert non_default_matching({}) == non_default_matching({"similarity": None, "saliency_rule": None}) == {}


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_nothing_of_a_call_is_held_after_it(pool):
    """The final norm's input and output serve the head within the call; a patched model keeps neither afterwards
    (they are ``[B, N, C]`` each: a ViT-B batch of 256 in fp32 would keep 300 MB alive between calls)."""
    model, x = tiny_vit(True, global_pool=pool), torch.randn(4, 1, 16, 16)
    assert alive_after_call(model.norm, lambda: model(x)) == []
    with quickmerge.patch(model, r=10):
        assert alive_after_call(model.norm, lambda: model(x)) == []
        features = model.forward_features(x)  # a head called on its own still pools by size: the pass's are kept
        assert torch.equal(model.forward_head(features), model(x))
