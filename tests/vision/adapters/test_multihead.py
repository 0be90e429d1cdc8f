"""The nn.MultiheadAttention hook that OpenCLIP's and torchvision's adapters share (tiny random models of both):
the queries and keys it computes, proportional attention, matching by the residual stream, and projecting only
what a merge reads."""

import pytest
import torch

import quickmerge

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def openclip():
    pytest.importorskip("open_clip")
    from .test_openclip_vit import tiny

    model = tiny()
    return model, model.positional_embedding, [b.attn for b in model.transformer.resblocks]


def torchvision():
    pytest.importorskip("torchvision")
    from .test_torchvision_vit import tiny

    model = tiny()
    return model, model.encoder.pos_embedding, [b.self_attention for b in model.encoder.layers]


FAMILIES = [openclip, torchvision]


@pytest.mark.parametrize("family", FAMILIES)
def test_computed_queries_and_keys_are_the_attention_s_own(family):
    """The class token's attention over the patches, from the queries and keys the hook computes, equals the weights
    nn.MultiheadAttention itself returns (calibration reads them at r = 0)."""
    from quickmerge.vision.budget import block_attention_perplexity

    (model, _, attentions), x = family(), torch.randn(3, 3, 16, 16)
    weights = []

    def keep(module, args, kwargs, out):
        _, w = module.forward(*args, need_weights=True, average_attn_weights=False)  # no hooks: no recursion
        weights.append(w[:, :, 0, 1:] / w[:, :, 0, 1:].sum(-1, keepdim=True))  # [B, H, patches]

    handles = [attention.register_forward_hook(keep, with_kwargs=True) for attention in attentions]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    want = [float((-torch.special.xlogy(w, w).sum(-1)).exp().mean(1).sum() / 3) for w in weights]
    got = block_attention_perplexity(model, x)
    assert got == pytest.approx(want, rel=1e-4)
    assert max(want) < 60  # attention is not uniform over the 64 patches: the check can fail


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["quickmerge", "tome"])
def test_proportional_attention_makes_merging_duplicates_exact(family, method):
    """Patches that are copies of each other, merged with their sizes, leave the class token unchanged."""
    model, positions, _ = family()
    with torch.no_grad():
        positions.zero_()
        x = torch.full((2, 3, 16, 16), -0.4)
        x[:, :, :, 12:] = 0.7
        ref = model(x)
        with quickmerge.patch(model, r=[16, 12, 8], method=method) as handle:
            assert torch.allclose(model(x), ref, atol=1e-5)
            handle.prop_attn = False
            assert not torch.allclose(model(x), ref, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("matching,r", [("bipartite", [28, 14, 8]), ("greedy", [40, 16, 4])])
def test_matching_by_the_residual_stream_joins_only_copies(family, matching, r):
    """Two flat regions, positions zeroed: ``similarity="hidden"`` (with the scaled rule) must pair tokens of one
    region only, so the class token's output is the unmerged one's."""
    model, positions, _ = family()
    with torch.no_grad():
        positions.zero_()
        x = torch.full((2, 3, 16, 16), -0.4)
        x[:, :, :, 10:] = 0.7
        ref = model(x)
        with quickmerge.patch(model, r=r, similarity="hidden", saliency_rule="scaled", matching=matching) as handle:
            assert torch.allclose(model(x), ref, atol=1e-5)
            handle.method = "pool"  # contiguous runs cross the regions' edge: the check can fail
            assert not torch.allclose(model(x), ref, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings,reads", [({}, "class_logits"), ({"similarity": "keys"}, "class_query"),
                                            ({"method": "tome"}, "mean_keys"), ({"method": "pool"}, "none"),
                                            ({"saliency": "mean"}, "all")])
def test_only_what_a_merge_reads_is_projected(family, settings, reads, monkeypatch):
    """Each reduced projection of the queries and keys (the class token's logits folded into the key weights, keys
    averaged over heads, ...) merges the same tokens into the same outputs as every query and key projected."""
    from quickmerge.vision.patch import MergeHandle

    (model, _, _), x = family(), torch.randn(3, 3, 16, 16)
    with torch.no_grad(), quickmerge.patch(model, r=[16, 12, 8], **settings) as handle:
        assert handle.attention_reads() == reads
        out, sizes = model(x), handle.sizes
        monkeypatch.setattr(MergeHandle, "attention_reads", lambda self: "all")
        assert torch.allclose(model(x), out, atol=1e-5, rtol=0) and torch.equal(handle.sizes, sizes)
    if reads != "none":  # merges that the attention decides: the comparison can fail
        with torch.no_grad(), quickmerge.patch(model, r=[16, 12, 8], method="pool"):
            assert not torch.allclose(model(x), out, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_calibration_reads_every_query(family):
    from quickmerge.vision.budget import block_attention_perplexity
    from quickmerge.vision.patch import get_handle

    (model, _, attentions), x = family(), torch.randn(2, 3, 16, 16)
    seen = []
    attentions[0].register_forward_pre_hook(lambda _m, args: seen.append(get_handle(model).attention_reads()))
    block_attention_perplexity(model, x)
    assert seen == ["all"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mask_the_model_passes_itself_is_refused(family):
    (model, _, attentions), x = family(), torch.randn(2, 3, 16, 16)
    n = 65
    attentions[1].register_forward_pre_hook(
        lambda _m, args, kwargs: (args, {**kwargs, "attn_mask": torch.zeros(n, n)}), with_kwargs=True)
    with quickmerge.patch(model, r=0), torch.no_grad():
        model(x)  # r = 0: the model's own mask passes untouched
    with quickmerge.patch(model, r=[4, 0, 0]), pytest.raises(ValueError, match="cannot be combined with a mask"):
        model(x)
