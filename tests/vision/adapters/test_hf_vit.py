"""quickmerge.patch on Hugging Face ViT, DeiT, DINOv2, DINOv2-with-registers and DINOv3 models (eager and sdpa)."""

import re
import warnings

import pytest
import torch

import quickmerge
from quickmerge.vision import get_handle
from quickmerge.vision.adapters import mean_by_size

from ...conftest import TRACING

transformers = pytest.importorskip("transformers")


# tokens never merged: [CLS], DeiT's distillation token, DINOv2's register tokens (3 in `tiny`), DINOv3's (2)
PREFIX = {"ViT": 1, "DeiT": 2, "Dinov2": 1, "Dinov2WithRegisters": 4, "DINOv3ViT": 3}


def family(cls_name: str) -> str:
    return max((f for f in PREFIX if cls_name.startswith(f)), key=len)


def tiny(cls_name: str, impl: str) -> torch.nn.Module:
    common = dict(image_size=16, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_labels=5, attn_implementation=impl)
    dinov2 = dict(mlp_ratio=2, layerscale_value=0.5)
    config = {
        "ViT": lambda: transformers.ViTConfig(**common, intermediate_size=64, encoder_stride=2),
        "DeiT": lambda: transformers.DeiTConfig(**common, intermediate_size=64, encoder_stride=2),
        "Dinov2": lambda: transformers.Dinov2Config(**common, **dinov2),
        "Dinov2WithRegisters": lambda: transformers.Dinov2WithRegistersConfig(**common, **dinov2,
                                                                              num_register_tokens=3),
        "DINOv3ViT": lambda: transformers.DINOv3ViTConfig(**common, intermediate_size=64, layerscale_value=0.5,
                                                          num_register_tokens=2),
    }[family(cls_name)]()
    return getattr(transformers, cls_name)(config).eval()


def position_embeddings(model) -> torch.Tensor:
    base = next((getattr(model, n) for n in ("vit", "deit", "dinov2", "dinov2_with_registers") if hasattr(model, n)),
                model)
    return base.embeddings.position_embeddings


def output(model, x):
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTModel", "ViTForImageClassification", "DeiTModel",
                                      "DeiTForImageClassificationWithTeacher", "Dinov2Model",
                                      "Dinov2WithRegistersModel", "DINOv3ViTModel"])
def test_r0_is_exact_and_unpatch_restores(cls_name, impl):
    model, x = tiny(cls_name, impl), torch.randn(2, 1, 16, 16)
    ref = output(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class here is a tested one
        handle = quickmerge.patch(model, r=0)
    assert model.config._attn_implementation == "quickmerge_vit"
    assert torch.allclose(output(model, x), ref, atol=1e-5, rtol=0)
    handle.r = 12
    merged = output(model, x)
    p = PREFIX[family(cls_name)]
    assert handle.tokens_per_layer == [64 + p, 52 + p, 40 + p]
    if not cls_name.endswith(("Classification", "WithTeacher")):
        assert merged.shape[1] == 28 + p
        merged, ref_cls = merged[:, 0], ref[:, 0]
    else:
        ref_cls = ref
    assert not torch.allclose(merged, ref_cls, atol=1e-5)
    quickmerge.unpatch(model)
    assert model.config._attn_implementation == impl
    assert torch.equal(output(model, x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassification", "Dinov2Model",
                                      "Dinov2WithRegistersModel"])
def test_proportional_attention_makes_merging_duplicates_exact(cls_name, impl):
    model = tiny(cls_name, impl)
    with torch.no_grad():
        position_embeddings(model).zero_()
    x = torch.full((2, 1, 16, 16), -0.4)
    ref = output(model, x)[:, :1]  # logits, or the [CLS] state
    with quickmerge.patch(model, r=20, method="pool") as handle:
        assert torch.allclose(output(model, x)[:, :1], ref, atol=1e-5)
        handle.prop_attn = False
        assert not torch.allclose(output(model, x)[:, :1], ref, atol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("method", ["pool", "tome", "quickmerge"])
def test_dinov3_merging_copies_that_share_a_rotation_is_exact(method, impl):
    # horizontal neighbours with equal pixels, given one rotation: merging each pair changes nothing -- if the merged
    # token keeps the pair's rotation (the rotary table merged with the tokens) and counts twice in attention
    model = tiny("DINOv3ViTModel", impl)
    with torch.no_grad():
        layers = model.layer if hasattr(model, "layer") else model.model.layer  # model.model from transformers 5.2x
        for layer in layers:  # sharper attention, where positions count (nearly uniform at initialisation)
            layer.attention.q_proj.weight *= 6
            layer.attention.k_proj.weight *= 6

    def paired(_m, _args, tables):
        rows = [t.unflatten(-2, (-1, 2))[..., :1, :] for t in tables]
        return tuple(r.expand(*r.shape[:-2], 2, r.shape[-1]).flatten(-3, -2) for r in rows)

    pairing = model.rope_embeddings.register_forward_hook(paired)
    strips = torch.randn(2, 1, 16, 4, 1, 2)  # 2 x 2 patches: columns 4j..4j+1 equal 4j+2..4j+3
    x = strips.expand(-1, -1, -1, -1, 2, -1).reshape(2, 1, 16, 16)
    ref = output(model, x)[:, :3]  # the class and register tokens' states
    with quickmerge.patch(model, r=[32, 0, 0], method=method) as handle:
        assert torch.allclose(output(model, x)[:, :3], ref, atol=1e-5)
        assert handle.tokens_per_layer[1] == 32 + 3
    pairing.remove()  # each patch's own rotation: a merged pair no longer sits at one position
    ref = output(model, x)[:, :3]
    with quickmerge.patch(model, r=[32, 0, 0], method="pool"):
        assert not torch.allclose(output(model, x)[:, :3], ref, atol=1e-3)


def test_dinov3_layers_taking_no_rotary_table_are_refused_untouched():
    model = tiny("DINOv3ViTModel", "sdpa")
    layers = model.layer if hasattr(model, "layer") else model.model.layer
    layers[1].forward = lambda hidden_states, attention_mask=None, rotary=None: hidden_states  # a renamed argument
    with pytest.raises(TypeError, match=r"block 1 \(DINOv3ViTLayer\) takes no 'position_embeddings'"):
        quickmerge.patch(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("method", ["quickmerge", "tome", "random", "pool"])
def test_every_method_keeps_cls_alone_and_reaches_the_ratio(method):
    model = tiny("ViTForImageClassification", "sdpa")
    with quickmerge.patch(model, ratio=0.25, method=method, trace_source=True) as handle:
        logits = output(model, torch.randn(3, 1, 16, 16))
        assert torch.isfinite(logits).all()
        assert (handle.source[:, 0] == 0).all() and (handle.source[:, 1:] != 0).all()  # [CLS] alone
        assert handle.source.max() == 16  # 64 patches -> 16 kept, plus [CLS]


@pytest.mark.parametrize("cls_name", ["DeiTForImageClassificationWithTeacher", "Dinov2WithRegistersModel",
                                      "DINOv3ViTModel"])
@pytest.mark.parametrize("method", ["quickmerge", "tome"])
def test_distillation_and_register_tokens_are_never_merged(cls_name, method):
    model, p = tiny(cls_name, "sdpa"), PREFIX[family(cls_name)]
    with quickmerge.patch(model, ratio=0.25, method=method, trace_source=True) as handle:
        out = output(model, torch.randn(3, 1, 16, 16))
        assert torch.isfinite(out).all()
        assert torch.equal(handle.source[:, :p], torch.arange(p).expand(3, p))  # each prefix token alone
        assert (handle.source[:, p:] >= p).all() and handle.source.max() == p + 15  # 64 patches -> 16
        assert (handle.sizes[:, :p] == 1).all() and (handle.sizes[:, p:].sum(1) == 64).all()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["Dinov2ForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_dinov2_heads_average_patches_by_size_and_stay_exact_on_duplicates(cls_name, impl):
    # the head reads the class token and the mean of the patch tokens; two flat regions, positions zeroed:
    # merging copies changes nothing if that mean is over patches (sizes), not over merged tokens
    model = tiny(cls_name, impl)
    with torch.no_grad():
        position_embeddings(model).zero_()
    x = torch.full((2, 1, 16, 16), -0.4)
    x[:, :, :, 12:] = 0.7
    ref = output(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = quickmerge.patch(model, r=[16, 12, 8], method="tome")
    assert torch.allclose(output(model, x), ref, atol=1e-5)
    handle.size_weighted_pool = False
    assert not torch.allclose(output(model, x), ref, atol=1e-4)
    quickmerge.unpatch(model)
    assert torch.equal(output(model, x), ref)


def test_a_dinov2_head_reads_the_patches_unmerged_and_its_base_alone_stays_merged():
    model, x = tiny("Dinov2ForImageClassification", "sdpa"), torch.randn(2, 1, 16, 16)
    seen = []  # a user's hook on the base model, registered before the patch
    model.dinov2.register_forward_hook(lambda _m, _a, out: seen.append(out.last_hidden_state.shape[1]))
    with torch.no_grad(), quickmerge.patch(model, r=8, unmerge="copy") as handle:  # the residual: test_patch_unmerge
        logits = output(model, x)
        tokens = model.dinov2(pixel_values=x).last_hidden_state  # the same merges, outside the head's call
        assert seen == [65, 41] and handle.tokens_per_layer == [65, 57, 49]
        mean = mean_by_size(tokens[:, 1:], handle.sizes[:, 1:])
        assert torch.allclose(logits, model.classifier(torch.cat([tokens[:, 0], mean], dim=-1)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTForMaskedImageModeling", "DeiTForMaskedImageModeling"])
def test_masked_image_modeling_decodes_each_patch_from_the_token_it_was_merged_into(cls_name, impl):
    # the head reshapes the patch tokens onto the grid and decodes pixels: merged tokens go back on the grid first
    # (unmerge="copy"; the residual unmerge, the default, below)
    model, x = tiny(cls_name, impl), torch.randn(2, 1, 16, 16)
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    base = model.vit if hasattr(model, "vit") else model.deit
    with torch.no_grad():
        ref = model(pixel_values=x, bool_masked_pos=mask)
        # which tokens the head decodes: DeiT's took [:, 1:-1] before transformers 5.1x, [:, 2:] after
        plain = base(pixel_values=x, bool_masked_pos=mask).last_hidden_state
        cuts = [cut for cut in (slice(1, None), slice(1, -1), slice(2, None))
                if plain[:, cut].shape[1] == 64 and torch.allclose(
            model.decoder(plain[:, cut].transpose(1, 2).reshape(2, -1, 8, 8)), ref.reconstruction, atol=1e-6)]
        assert len(cuts) == 1
        handle = quickmerge.patch(model, r=0, trace_source=True, unmerge="copy")
        same = model(pixel_values=x, bool_masked_pos=mask)
        assert torch.allclose(same.reconstruction, ref.reconstruction, atol=1e-5, rtol=0)
        handle.r = 8
        out = model(pixel_values=x, bool_masked_pos=mask)
        tokens = base(pixel_values=x, bool_masked_pos=mask).last_hidden_state  # merged: the base alone
        assert tokens.shape[1] == 65 + PREFIX[family(cls_name)] - 1 - 24
        full = tokens.gather(1, handle.source[..., None].expand(-1, -1, tokens.shape[-1]))  # [B, N0, C]
        patches = full[:, cuts[0]]
        want = model.decoder(patches.transpose(1, 2).reshape(2, -1, 8, 8))
        assert out.reconstruction.shape == ref.reconstruction.shape and torch.isfinite(out.loss)
        assert torch.allclose(out.reconstruction, want, atol=1e-5, rtol=0)
        assert not torch.allclose(out.reconstruction, ref.reconstruction, atol=1e-3)
        handle.size_weighted_pool = False  # pooling only: a reshape always needs every patch
        assert torch.equal(model(pixel_values=x, bool_masked_pos=mask).reconstruction, out.reconstruction)
    quickmerge.unpatch(model)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x, bool_masked_pos=mask).reconstruction, ref.reconstruction)


# the last linear of each block's two branches (both layer layouts): zeroed, a block returns its input
BRANCH_OUTPUTS = re.compile(r"(\.output\.dense|\.o_proj|\.fc2)\.(weight|bias)$")


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTForMaskedImageModeling", "DeiTForMaskedImageModeling"])
def test_masked_image_modeling_unmerged_by_residual_decodes_the_unmerged_stream_when_blocks_only_average(cls_name,
                                                                                                      impl):
    """With every branch zeroed each block passes its input on, so merging only averages the residual stream: the
    residual unmerge (the default) puts each patch's own stream back before the final norm, and the decoded pixels
    are the unmerged model's; copying's are not. Outside the head's call the norm is left alone."""
    model, x = tiny(cls_name, impl), torch.randn(2, 1, 16, 16)
    branches = [p for name, p in model.named_parameters() if BRANCH_OUTPUTS.search(name)]
    assert len(branches) == 4 * 3
    with torch.no_grad():
        for p in branches:
            p.zero_()
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    base = model.vit if hasattr(model, "vit") else model.deit
    with torch.no_grad():
        ref = model(pixel_values=x, bool_masked_pos=mask).reconstruction
        with quickmerge.patch(model, r=8) as handle:
            out = model(pixel_values=x, bool_masked_pos=mask).reconstruction
            assert handle.tokens_per_layer[1:] == [handle.tokens_per_layer[0] - 8, handle.tokens_per_layer[0] - 16]
            assert torch.allclose(out, ref, atol=1e-5, rtol=0)
            assert base(pixel_values=x).last_hidden_state.shape[1] == handle.tokens_per_layer[0] - 24
            assert handle._deviations is None  # the base alone keeps nothing
            handle.unmerge = "copy"
            copied = model(pixel_values=x, bool_masked_pos=mask).reconstruction
            assert not torch.allclose(copied, ref, atol=1e-3)


def test_masked_image_modeling_with_its_final_norm_renamed_is_refused():
    model = tiny("ViTForMaskedImageModeling", "sdpa")
    model.vit.final_norm = model.vit.layernorm
    del model.vit.layernorm
    with pytest.raises(TypeError, match="no final norm named layernorm"):
        quickmerge.patch(model, r=8)
    assert not hasattr(model, "_quickmerge_handle") and model.config._attn_implementation == "sdpa"
    model.vit.layernorm = model.vit.final_norm
    handle = quickmerge.patch(model, r=8)
    model.vit.layernorm = torch.nn.LayerNorm(32)  # a norm the hook is not on: the stream would stay merged
    with torch.no_grad(), pytest.raises(RuntimeError, match="without calling LayerNorm"):
        model(pixel_values=torch.randn(2, 1, 16, 16))
    handle.unmerge = "copy"
    with torch.no_grad():
        assert model(pixel_values=torch.randn(2, 1, 16, 16)).reconstruction.shape == (2, 1, 16, 16)


@pytest.mark.parametrize("cls_name", ["ViTForMaskedImageModeling", "DeiTForMaskedImageModeling"])
def test_masked_image_modeling_compiles_whole_and_follows_the_handle(cls_name):
    """The residual unmerge's norm pre-hook (a dense-head reader opened inside the head's call) traces without a
    graph break; switching to copying and unpatching recompile instead of replaying a stale graph."""
    model, x = tiny(cls_name, "sdpa"), torch.randn(2, 1, 16, 16)
    mask = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        ref = model(pixel_values=x, bool_masked_pos=mask).reconstruction
        handle = quickmerge.patch(model, r=8, method="tome")  # no near-ties for compiled arithmetic to flip
        compiled = torch.compile(model, backend=TRACING, fullgraph=True)  # a graph break raises
        outputs = {}
        for unmerge in ("residual", "copy"):
            handle.unmerge = unmerge
            outputs[unmerge] = model(pixel_values=x, bool_masked_pos=mask).reconstruction
            assert torch.allclose(compiled(pixel_values=x, bool_masked_pos=mask).reconstruction, outputs[unmerge],
                                  atol=1e-5, rtol=0)
        assert not torch.allclose(outputs["residual"], outputs["copy"], atol=1e-3)
        quickmerge.unpatch(model)
        assert torch.allclose(compiled(pixel_values=x, bool_masked_pos=mask).reconstruction, ref, atol=1e-5, rtol=0)
    torch.compiler.reset()


@pytest.mark.filterwarnings("error:Dynamo detected a call to a `functools.lru_cache`")  # signatures read when hooked
def test_a_patched_dinov2_head_compiles_whole_and_pools_by_size():
    # compiled by inductor, torch.compile's default (the other compile tests here trace through TRACING);
    # the head's check that its input is the plain mean reads data: eager only, so fullgraph tracing succeeds
    # (ToMe-style matching: QuickMerge++'s rank-weighted scores have near-ties that compiled arithmetic can flip
    # on about one image in 40, merging that image differently)
    model, x = tiny("Dinov2ForImageClassification", "sdpa"), torch.randn(2, 1, 16, 16)
    handle = quickmerge.patch(model, r=12, method="tome", trace_source=True)
    with torch.no_grad():
        weighted, source = output(model, x), handle.source
        handle.size_weighted_pool = False
        plain = output(model, x)
        handle.size_weighted_pool = True
        compiled = torch.compile(model, fullgraph=True)(pixel_values=x).logits
    assert torch.equal(handle.source, source)  # the same merges
    assert not torch.allclose(weighted, plain, atol=1e-4)
    assert torch.allclose(compiled, weighted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls_name", ["DINOv3ViTBackbone", "ViTPixelBackbone"])
def test_heads_that_need_the_patch_grid_are_refused(cls_name):
    # merged tokens reshaped onto the grid gave a feature map of the wrong width without an error; a subclass
    # named as a backbone (its own forward unknown) is refused too
    if cls_name == "ViTPixelBackbone":
        model = type(cls_name, (transformers.ViTModel,), {})(tiny("ViTModel", "sdpa").config).eval()
    else:
        model = tiny(cls_name, "sdpa")
    if cls_name == "DINOv3ViTBackbone":
        if hasattr(model, "model"):
            pytest.skip("this transformers' DINOv3ViTBackbone returns its stages from an encoder: patched (below)")
        with pytest.raises(TypeError, match="DINOv3ViTBackbone has no encoder module returning the hidden states"):
            quickmerge.patch(model, r=8)
        assert model.config._attn_implementation == "sdpa" and not hasattr(model, "_quickmerge_handle")
        return
    hooks = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]  # 5.24 has its own
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refusal comes before the untested-class warning
        with pytest.raises(TypeError, match=f"{cls_name} puts every patch token back on the patch grid"):
            quickmerge.patch(model, r=8)
    assert not hasattr(model, "_quickmerge_handle")
    assert model.config._attn_implementation == "sdpa"
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks


@pytest.mark.parametrize("cls_name", ["ViTModel", "Dinov2Model"])
def test_gradient_checkpointing_refuses_to_train(cls_name):
    model = tiny(cls_name, "sdpa")
    # transformers 5.24 renamed gradient_checkpointing_enable; the guard must see either
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with quickmerge.patch(model, r=8):
        with torch.no_grad():
            assert torch.isfinite(output(model, torch.randn(2, 1, 16, 16))).all()
        model.train()
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            output(model, torch.randn(2, 1, 16, 16)).sum().backward()


def test_a_patched_forward_with_gradients_reads_no_deprecated_name():
    # transformers 5.24 warns on every read of is_gradient_checkpointing (gone in v6)
    model = tiny("ViTModel", "sdpa").train()
    with quickmerge.patch(model, r=8), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        output(model, torch.randn(2, 1, 16, 16)).sum().backward()


def test_checkpointing_is_read_from_the_layers_where_a_model_has_neither_name():
    from quickmerge.vision.adapters.hf_vit import activation_checkpointing

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert not activation_checkpointing(model)
    model[1].gradient_checkpointing = True
    assert activation_checkpointing(model)


def _untouched(model, impl: str) -> bool:
    return (get_handle(model) is None and model.config._attn_implementation == impl
            and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()))


@pytest.mark.parametrize("prop_attn", [True, False])
def test_flash_attention_is_refused_before_any_hook(prop_attn):
    # transformers finds a flash kernel by the config's implementation name, which is quickmerge's while patched
    model = tiny("ViTModel", "sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"  # set without the package's import check
    with pytest.raises(ValueError, match=r"'flash_attention_2'.*attn_implementation='sdpa'"):
        quickmerge.patch(model, r=8, prop_attn=prop_attn)
    assert _untouched(model, "flash_attention_2")


def test_flex_attention_merges_without_proportional_attention_and_refuses_it(monkeypatch):
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # transformers' own flex function: kvpress, once imported, wraps it in a way that breaks ViT's call
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flex_attention", flex_attention_forward)
    model, x = tiny("ViTModel", "sdpa"), torch.randn(2, 1, 16, 16)
    flex = tiny("ViTModel", "flex_attention")
    flex.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match=r"prop_attn=True.*'flex_attention'.*prop_attn=False"):
        quickmerge.patch(flex, r=8)  # its float mask crashes torch 2.14's compiled kernel on the CPU
    assert _untouched(flex, "flex_attention")
    with torch.no_grad():
        ref = output(flex, x)
        quickmerge.patch(model, r=8, prop_attn=False)
        handle = quickmerge.patch(flex, r=8, prop_attn=False)
        merged = output(flex, x)
        assert handle.tokens_per_layer == [65, 57, 49]
        assert torch.allclose(merged, output(model, x), atol=1e-5, rtol=0)  # the same merge as under SDPA
        assert not torch.allclose(merged[:, 0], ref[:, 0], atol=1e-5)
        handle.prop_attn = True  # turned on after patching: refused at the call, not silently dropped
        with pytest.raises(ValueError, match="'flex_attention' does not take"):
            output(flex, x)
        handle.prop_attn = False
        assert torch.equal(output(flex, x), merged)
    quickmerge.unpatch(flex)
    assert _untouched(flex, "flex_attention")


def _kvpress_wrapper(func):
    """kvpress's wrapper, which ``import kvpress`` puts around every registered attention function."""
    return pytest.importorskip("kvpress.attention_patch").attention_patch(func)


def _dropout_by_position(func):
    """The same calling convention without kvpress: ``dropout`` passed as the sixth argument."""
    def wrapper(module, query, key, value, attention_mask, dropout, **kwargs):
        return func(module, query, key, value, attention_mask, dropout, **kwargs)
    return wrapper


@pytest.mark.parametrize("wrap", [_kvpress_wrapper, _dropout_by_position])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_still_runs_when_kvpress_wraps_it_after_patching(monkeypatch, wrap, impl):
    # a vision-language pipeline: the vision tower patched first, then kvpress imported for the language model
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, x = tiny("ViTModel", impl), torch.randn(2, 1, 16, 16)
    handle = quickmerge.patch(model, r=12)
    with torch.no_grad():
        merged = output(model, x)
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "quickmerge_vit", wrap(ALL_ATTENTION_FUNCTIONS["quickmerge_vit"]))
        assert torch.equal(output(model, x), merged)
    assert handle.tokens_per_layer == [65, 53, 41]


@pytest.mark.parametrize("matching,r", [("bipartite", [28, 14, 8]), ("greedy", [40, 16, 4])])
@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassification", "Dinov2Model",
                                      "Dinov2WithRegistersModel"])
def test_matching_by_the_residual_stream_joins_only_copies(cls_name, matching, r):
    """Two flat regions, positions zeroed: ``similarity="hidden"`` (with the scaled rule) must pair tokens of one
    region only, past the prefix tokens, so the merged model's first output is the unmerged one's."""
    model = tiny(cls_name, "sdpa")
    with torch.no_grad():
        position_embeddings(model).zero_()
    x = torch.full((2, 1, 16, 16), -0.4)
    x[..., 10:] = 0.7
    ref = output(model, x)[:, :1]
    with quickmerge.patch(model, r=r, similarity="hidden", saliency_rule="scaled", matching=matching) as handle:
        assert torch.allclose(output(model, x)[:, :1], ref, atol=1e-5)
        assert handle.tokens_per_layer[-1] < 64
        handle.method = "pool"  # contiguous runs cross the regions' edge: the check can fail
        assert not torch.allclose(output(model, x)[:, :1], ref, atol=1e-4)


@pytest.mark.parametrize("cls_name", ["ViTModel", "Dinov2Model", "Dinov2WithRegistersModel"])
def test_hidden_states_are_the_merged_blocks_inputs_even_after_an_unpatched_run(cls_name):
    """transformers (5.x) records hidden states by forward hooks on the layers, installed at the first call: a
    model run before patching has them ahead of quickmerge's, which then saw the block's own sum, of the unmerged
    length and without the MLP branch (the merged output replaces it in a hook of quickmerge's)."""
    model, x = tiny(cls_name, "sdpa"), torch.randn(2, 1, 16, 16)
    p = PREFIX[family(cls_name)]
    with torch.no_grad():
        model(pixel_values=x, output_hidden_states=True)
        handle = quickmerge.patch(model, r=12)
        out = model(pixel_values=x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [*handle.tokens_per_layer, 28 + p]
    assert handle.tokens_per_layer == [64 + p, 52 + p, 40 + p]
    assert torch.allclose(model.layernorm(out.hidden_states[-1]), out.last_hidden_state, atol=1e-6, rtol=0)


def tiny_backbone(cls_name: str, impl: str = "sdpa", **extra) -> torch.nn.Module:
    per_family = {"Dinov2": dict(mlp_ratio=2), "Dinov2WithRegisters": dict(mlp_ratio=2, num_register_tokens=3),
                  "DINOv3ViT": dict(intermediate_size=64, num_register_tokens=2)}[family(cls_name)]
    config = getattr(transformers, f"{family(cls_name)}Config")(
        image_size=16, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        layerscale_value=0.5, out_features=["stage1", "stage2", "stage3"], attn_implementation=impl, **per_family,
        **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    if not hasattr(model, "encoder") and not hasattr(model, "model"):
        pytest.skip(f"this transformers' {cls_name} gathers its stages in its own loop: refused (above)")
    return model


def encoder_and_norm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The module returning a backbone's stage hidden states, and the norm its feature maps get."""
    return (model.encoder, model.layernorm) if hasattr(model, "encoder") else (model.model, model.norm)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["Dinov2Backbone", "Dinov2WithRegistersBackbone", "DINOv3ViTBackbone"])
def test_a_backbone_s_feature_maps_carry_each_patch_s_merged_token(cls_name, impl):
    """Dinov2Backbone reshapes the hidden states of its stages into [B, C, 8, 8] maps in its own forward: each
    patch of stage j's map is the (normed) token it was merged into by block j, every such token on the map
    (``unmerge="copy"``; the residual unmerge, the default, below)."""
    model, x = tiny_backbone(cls_name, impl), torch.randn(2, 1, 16, 16)
    p = PREFIX[family(cls_name)]
    with torch.no_grad():
        ref = model(pixel_values=x).feature_maps
        hook_counts = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]  # 5.24's own
        handle = quickmerge.patch(model, r=0, unmerge="copy")
        assert all(torch.equal(a, b) for a, b in zip(model(pixel_values=x).feature_maps, ref, strict=True))
        handle.r = 12
        blocks = []  # each block's merged output, as the next block (or the final norm) receives it
        encoder, norm = encoder_and_norm(model)
        hooks = [layer.register_forward_hook(lambda _m, _a, out: blocks.append(out)) for layer in encoder.layer]
        out = model(pixel_values=x, output_hidden_states=True)
        for hook in hooks:
            hook.remove()
    assert [tuple(m.shape) for m in out.feature_maps] == [(2, 32, 8, 8)] * 3
    assert [h.shape[1] for h in out.hidden_states] == [64 + p] * 4  # on the grid too
    for stage, (fmap, tokens) in enumerate(zip(out.feature_maps, blocks, strict=True), start=1):
        normed = norm(tokens)[:, p:]  # [B, 64 - 12 * stage, C]
        assert normed.shape[1] == 64 - 12 * stage
        patches = fmap.flatten(2).transpose(1, 2)  # [B, 64, C]
        gaps = (patches[:, :, None] - normed[:, None]).abs().amax(dim=-1)  # [B, 64, tokens]
        assert (gaps.amin(dim=2) < 1e-6).all()  # each patch is one of the stage's tokens
        assert (gaps.amin(dim=1) < 1e-6).all()  # and each token covers some patch
    assert not any(torch.allclose(a, b, atol=1e-3) for a, b in zip(out.feature_maps[1:], ref[1:], strict=True))
    quickmerge.unpatch(model)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hook_counts
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(pixel_values=x).feature_maps, ref, strict=True))


def test_merging_copies_leaves_a_backbone_s_feature_maps_exact():
    """Identical patches merged with their sizes leave every token's state as it was: back on the grid, every
    stage's map is the unmerged model's (proportional attention, and the unmerge of each stage)."""
    model = tiny_backbone("Dinov2Backbone")
    with torch.no_grad():
        model.embeddings.position_embeddings.zero_()
        x = torch.full((2, 1, 16, 16), 0.7)
        ref = model(pixel_values=x).feature_maps
        with quickmerge.patch(model, r=20, method="pool") as handle:
            out = model(pixel_values=x).feature_maps
            assert handle.tokens_per_layer == [65, 45, 25]
    for merged, unmerged in zip(out, ref, strict=True):
        assert torch.allclose(merged, unmerged, atol=1e-5, rtol=0)


def test_depth_anything_runs_on_its_patched_backbone():
    """Depth Anything reassembles its backbone's hidden states (with the class token, not reshaped) by the patch
    grid: patching model.backbone gives it every patch back."""
    backbone = transformers.Dinov2Config(image_size=16, patch_size=2, num_channels=3, hidden_size=32,
                                         num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
                                         layerscale_value=0.5, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, patch_size=2,
                                              neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                                              head_hidden_size=8)
    torch.manual_seed(0)
    model, x = transformers.DepthAnythingForDepthEstimation(config).eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x).predicted_depth
        handle = quickmerge.patch(model.backbone, r=0)
        assert torch.equal(model(pixel_values=x).predicted_depth, ref)
        handle.r = 8
        depth = model(pixel_values=x).predicted_depth
    assert handle.tokens_per_layer == [65, 57, 49, 41]
    assert depth.shape == ref.shape and torch.isfinite(depth).all()


def test_expanding_a_stage_checks_its_index_and_token_count():
    model = tiny_backbone("Dinov2Backbone")
    handle = quickmerge.patch(model, r=12)
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 1, 16, 16))
    tokens = torch.randn(2, 53, 32)
    assert handle.expand_to_patches(tokens, stage=1).shape == (2, 65, 32)
    assert handle.expand_to_patches(torch.randn(2, 65, 32), stage=0).shape == (2, 65, 32)  # before any merge
    with pytest.raises(ValueError, match=r"stage must be in \[0, 3\]"):
        handle.expand_to_patches(tokens, stage=4)
    with pytest.raises(ValueError, match=r"stage 2 of the last pass has 41 tokens per image for a batch of 2"):
        handle.expand_to_patches(tokens, stage=2)
