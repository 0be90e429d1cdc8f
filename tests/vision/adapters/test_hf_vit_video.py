"""quickmerge.patch on Hugging Face video transformers built from ViT's layer: VideoMAE and ViViT (eager and sdpa).

Tiny random configs: 4 frames of 16 x 16, one channel; VideoMAE's tubelets 2 frames x 4 x 4 (32 tokens, no class
token), ViViT's 2 x 4 x 4 (32 tokens after its class token)."""

import re
import warnings

import pytest
import torch

import quickmerge
from quickmerge.vision.adapters import mean_by_size

transformers = pytest.importorskip("transformers")

PREFIX = {"VideoMAE": 0, "Vivit": 1}  # VideoMAE has no class token
TUBELETS = 32


def tiny(cls_name: str, impl: str = "sdpa", **extra) -> torch.nn.Module:
    common = dict(image_size=16, num_frames=4, num_channels=1, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, intermediate_size=64, num_labels=5, attn_implementation=impl)
    if cls_name.startswith("Vivit"):
        config = transformers.VivitConfig(**common, tubelet_size=[2, 4, 4], **extra)
    else:
        config = transformers.VideoMAEConfig(**common, patch_size=4, tubelet_size=2, decoder_hidden_size=16,
                                             decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                             decoder_intermediate_size=32, **extra)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


def clip(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """``[B, T, C, H, W]`` pixels."""
    return torch.randn(batch, 4, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def visible_mask(batch: int = 2) -> torch.Tensor:
    """VideoMAE pre-training's mask: every 4th tubelet hidden (each clip must hide as many)."""
    mask = torch.zeros(batch, TUBELETS, dtype=torch.bool)
    mask[:, ::4] = True
    return mask


def output(model, x, **kwargs):
    out = model(pixel_values=x, **kwargs)
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise AssertionError(type(out))


CASES = [("VideoMAEModel", {}), ("VideoMAEForVideoClassification", {}),
         ("VideoMAEForVideoClassification", {"use_mean_pooling": False}), ("VideoMAEForPreTraining", {}),
         ("VideoMAEForPreTraining", {"use_mean_pooling": False}), ("VivitModel", {}),
         ("VivitForVideoClassification", {})]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(("cls_name", "extra"), CASES)
def test_r0_is_exact_and_unpatch_restores(cls_name, extra, impl):
    model, x = tiny(cls_name, impl, **extra), clip()
    kwargs = {"bool_masked_pos": visible_mask()} if cls_name.endswith("PreTraining") else {}
    with torch.no_grad():
        ref = output(model, x, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every class here is a tested one
            handle = quickmerge.patch(model, r=0)
        assert model.config._attn_implementation == "quickmerge_vit"
        assert torch.allclose(output(model, x, **kwargs), ref, atol=1e-5, rtol=0)
        handle.r = 6
        merged = output(model, x, **kwargs)
        p = PREFIX["Vivit" if cls_name.startswith("Vivit") else "VideoMAE"]
        n = TUBELETS - 8 if kwargs else TUBELETS  # pre-training encodes the visible tubelets only
        assert handle.tokens_per_layer == [n + p, n - 6 + p, n - 12 + p]
        if cls_name.endswith("Model"):
            assert merged.shape[1] == n - 18 + p
        else:  # the head's own output: logits, or pixels of every hidden tubelet (the residual unmerge gives the
            assert merged.shape == ref.shape  # decoder nearly the unmerged streams: tests below)
            assert kwargs or not torch.allclose(merged, ref, atol=1e-6, rtol=0)  # merged, if closely
        quickmerge.unpatch(model)
        assert model.config._attn_implementation == impl
        assert torch.equal(output(model, x, **kwargs), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["quickmerge", "tome", "random", "pool"])
def test_videomae_merges_every_tubelet_having_no_class_token(method):
    model = tiny("VideoMAEModel")
    with torch.no_grad(), quickmerge.patch(model, ratio=0.25, method=method, trace_source=True) as handle:
        assert not handle.has_class_token and handle.num_prefix_tokens == 0
        assert torch.isfinite(output(model, clip(3))).all()
        assert handle.source.shape == (3, TUBELETS) and handle.source.max() == 7  # 32 tubelets -> 8 tokens
        if method != "random":  # dropped tubelets weigh nothing
            assert (handle.sizes.sum(1) == TUBELETS).all()


def test_videomae_saliency_asks_as_many_queries_as_set(monkeypatch):
    """No class token: every merge step's saliency comes from ``saliency_queries`` spread queries."""
    import importlib

    patch_module = importlib.import_module("quickmerge.vision.patch")
    real, asked = patch_module.attention_saliency, []

    def spy(q, k, scale, log_size, source, num_queries, **kwargs):
        asked.append((source, num_queries))
        return real(q, k, scale, log_size, source, num_queries, **kwargs)

    model, x = tiny("VideoMAEForVideoClassification"), clip()
    monkeypatch.setattr(patch_module, "attention_saliency", spy)
    with torch.no_grad(), quickmerge.patch(model, r=6, saliency_queries=3) as handle:
        model(pixel_values=x)
        assert asked == [("queries", 3)] * 3
        handle.saliency_queries = 8
        model(pixel_values=x)
        assert asked[3:] == [("queries", 8)] * 3
        handle.saliency = "mean"  # one query, asked as such, not replaced by spread queries
        model(pixel_values=x)
        assert asked[6:] == [("mean", 8)] * 3
        with pytest.raises(ValueError, match="saliency_queries must be an integer >= 1"):
            handle.saliency_queries = 0
    with pytest.raises(TypeError, match="saliency_queries must be an integer"):
        quickmerge.patch(model, r=6, saliency_queries="8")
    assert patch_module.get_handle(model) is None  # refused before anything was hooked


@pytest.mark.parametrize("method", ["quickmerge", "tome"])
def test_vivit_keeps_its_class_token_alone(method):
    model = tiny("VivitForVideoClassification")
    with torch.no_grad(), quickmerge.patch(model, ratio=0.25, method=method, trace_source=True) as handle:
        assert handle.has_class_token and handle.num_prefix_tokens == 1
        assert torch.isfinite(output(model, clip(3))).all()
        assert (handle.source[:, 0] == 0).all() and (handle.source[:, 1:] != 0).all()
        assert handle.source.max() == 8  # 32 tubelets -> 8 tokens, after the class token


def still_frames(model) -> torch.Tensor:
    """A clip whose tubelets are two flat regions (of 24 and 8 tubelets), with the model's positions zeroed:
    tubelets of one region are copies, which merging with proportional attention must leave exact."""
    base = model.videomae if hasattr(model, "videomae") else model.vivit if hasattr(model, "vivit") else model
    with torch.no_grad():
        if isinstance(base.embeddings.position_embeddings, torch.nn.Parameter):
            base.embeddings.position_embeddings.zero_()
        else:  # VideoMAE's fixed sinusoid table, a plain tensor
            base.embeddings.position_embeddings = torch.zeros_like(base.embeddings.position_embeddings)
    x = torch.full((2, 4, 1, 16, 16), -0.4)
    x[..., 12:] = 0.7  # a quarter of the tubelets
    return x


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize(("cls_name", "extra"), [("VideoMAEForVideoClassification", {}),
                                                 ("VideoMAEForVideoClassification", {"use_mean_pooling": False}),
                                                 ("VivitForVideoClassification", {})])
def test_merging_copies_leaves_the_classifier_exact(cls_name, extra, impl):
    # VideoMAE's head averages the tokens (or reads token 0) in its own forward: exact only if it gets them back
    # on the tubelets; ViViT's reads its class token, exact with proportional attention
    model = tiny(cls_name, impl, **extra)
    x = still_frames(model)
    with torch.no_grad():
        ref = output(model, x)
        # ToMe's alternate sets hold copies of each region in every block at these r (larger ones pair regions)
        with quickmerge.patch(model, r=[12, 4, 2], method="tome") as handle:
            assert torch.allclose(output(model, x), ref, atol=1e-5)
            handle.prop_attn = False
            assert not torch.allclose(output(model, x), ref, atol=1e-4)
            if extra.get("use_mean_pooling", True) and cls_name.startswith("VideoMAE"):
                handle.prop_attn, handle.size_weighted_pool = True, False  # the plain mean of merged tokens
                assert not torch.allclose(output(model, x), ref, atol=1e-4)


def test_the_mean_pooling_head_averages_the_tubelets_and_its_base_alone_stays_merged():
    model, x = tiny("VideoMAEForVideoClassification"), clip()
    with torch.no_grad(), quickmerge.patch(model, r=6, unmerge="copy") as handle:
        logits = output(model, x)
        tokens = model.videomae(pixel_values=x).last_hidden_state  # the same merges, outside the head's call
        assert tokens.shape[1] == TUBELETS - 18
        want = model.classifier(model.fc_norm(mean_by_size(tokens, handle.sizes)))
        assert torch.allclose(logits, want, atol=1e-5, rtol=0)
        handle.unmerge = "residual"  # a size-weighted merge's deviations sum to 0 in each group: the same mean
        assert torch.allclose(output(model, x), want, atol=1e-5, rtol=0)


def test_without_mean_pooling_the_head_reads_the_first_tubelet_s_token():
    model, x = tiny("VideoMAEForVideoClassification", use_mean_pooling=False), clip()
    with torch.no_grad(), quickmerge.patch(model, r=6, unmerge="copy", trace_source=True) as handle:
        logits = output(model, x)
        tokens = model.videomae(pixel_values=x).last_hidden_state  # normed by the base model's final norm
        first = tokens[torch.arange(2), handle.source[:, 0]]  # the token tubelet 0 was merged into
        assert torch.allclose(logits, model.classifier(first), atol=1e-5, rtol=0)
        assert not torch.allclose(logits, model.classifier(tokens[:, 0]), atol=1e-4)  # token 0 is another group


# the last linear of each block's two branches (both layer layouts): zeroed, a block returns its input
BRANCH_OUTPUTS = re.compile(r"(videomae|vivit)\..*(\.output\.dense|\.o_proj|\.fc2)\.(weight|bias)$")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("use_mean_pooling", [True, False])
def test_pre_training_decodes_the_unmerged_stream_by_residual_when_blocks_only_average(use_mean_pooling, impl):
    """The decoder puts a token on every visible tubelet. With the encoder's branches zeroed its blocks pass their
    input on, so merging only averages the residual stream: the residual unmerge (the default) gives each tubelet its
    own stream back, with a final norm (``use_mean_pooling=False``) before it and without one after the last block,
    and the decoder reads the unmerged model's tokens; copying's are not."""
    model, x = tiny("VideoMAEForPreTraining", impl, use_mean_pooling=use_mean_pooling), clip()
    assert (model.videomae.layernorm is None) == use_mean_pooling
    branches = [p for name, p in model.named_parameters() if BRANCH_OUTPUTS.search(name)]
    assert len(branches) == 4 * 3
    mask = visible_mask()
    seen = []  # the decoder's input, a token on every visible tubelet
    model.encoder_to_decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for p in branches:
            p.zero_()
        ref = model(pixel_values=x, bool_masked_pos=mask).logits
        with quickmerge.patch(model, r=6) as handle:
            out = model(pixel_values=x, bool_masked_pos=mask).logits
            assert handle.tokens_per_layer == [24, 18, 12] and seen[1].shape == seen[0].shape == (2, 24, 32)
            assert torch.allclose(seen[1], seen[0], atol=1e-5, rtol=0)
            assert torch.allclose(out, ref, atol=1e-6, rtol=0)
            assert model.videomae(pixel_values=x, bool_masked_pos=mask).last_hidden_state.shape[1] == 6
            assert handle._deviations is None  # the base alone keeps nothing
            handle.unmerge = "copy"
            model(pixel_values=x, bool_masked_pos=mask)
            assert not torch.allclose(seen[-1], seen[0], atol=1e-2)


def test_pre_training_decodes_each_tubelet_from_the_token_it_was_merged_into():
    model, x, mask = tiny("VideoMAEForPreTraining"), clip(), visible_mask()
    seen = []  # the decoder's input, a token on every visible tubelet
    model.encoder_to_decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad(), quickmerge.patch(model, r=6, unmerge="copy", trace_source=True) as handle:
        out = model(pixel_values=x, bool_masked_pos=mask)
        tokens = model.videomae(pixel_values=x, bool_masked_pos=mask).last_hidden_state  # merged: the base alone
        assert tokens.shape[1] == 6
        full = tokens.gather(1, handle.source[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, 24 visible, C]
    assert seen[0].shape == (2, 24, 32) and torch.allclose(seen[0], full, atol=1e-6, rtol=0)
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 8, 4 * 4 * 2)  # pixels of the 8 hidden tubelets


def test_vivit_hidden_states_hold_the_merged_blocks_inputs():
    model, x = tiny("VivitModel"), clip()
    with torch.no_grad(), quickmerge.patch(model, r=6) as handle:
        if transformers.__version__.startswith("5.0."):
            pytest.skip("transformers 5.0 records hidden states inside the layers: refused (test_hf_vit.py)")
        out = model(pixel_values=x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [*handle.tokens_per_layer, 15]
    assert handle.tokens_per_layer == [33, 27, 21]


def test_entropy_budget_is_calibrated_on_videomae_without_a_class_token():
    """VideoMAE has no class token: the per-block budget reads its tubelets' own attention, and a schedule from
    it runs."""
    from quickmerge.vision.budget import block_attention_perplexity, entropy_schedule

    model = tiny("VideoMAEForVideoClassification")
    with torch.no_grad():
        for layer in model.videomae.encoder.layer:
            layer.attention.attention.query.weight.mul_(30.0)  # sharper attention than random weights give
            layer.attention.attention.key.weight.mul_(30.0)
        values = block_attention_perplexity(model, clip(3))
        assert len(values) == 3 and all(1.0 <= v < TUBELETS - 1 for v in values)
        for layer in model.videomae.encoder.layer:  # zero keys (VideoMAE's have no bias): uniform attention
            torch.nn.init.zeros_(layer.attention.attention.key.weight)
        assert block_attention_perplexity(model, clip(3)) == pytest.approx([float(TUBELETS)] * 3, rel=1e-5)
        with quickmerge.patch(model, r=entropy_schedule(values, TUBELETS, 6)) as handle:
            model(pixel_values=clip(2))
    assert handle.tokens_per_layer[-1] < TUBELETS
