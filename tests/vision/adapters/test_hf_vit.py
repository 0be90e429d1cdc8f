"""quickmerge.patch on Hugging Face ViTModel / ViTForImageClassification (eager and sdpa)."""

import warnings

import pytest
import torch

import quickmerge

transformers = pytest.importorskip("transformers")


def tiny(cls_name: str, impl: str) -> torch.nn.Module:
    common = dict(image_size=16, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=3,
                  num_attention_heads=4, num_labels=5, attn_implementation=impl)
    if cls_name.startswith("Dinov2"):
        config = transformers.Dinov2Config(**common, mlp_ratio=2, layerscale_value=0.5)
    else:
        config = transformers.ViTConfig(**common, intermediate_size=64)
    return getattr(transformers, cls_name)(config).eval()


def position_embeddings(model) -> torch.Tensor:
    base = next((getattr(model, n) for n in ("vit", "dinov2") if hasattr(model, n)), model)
    return base.embeddings.position_embeddings


def output(model, x):
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTModel", "ViTForImageClassification", "Dinov2Model"])
def test_r0_is_exact_and_unpatch_restores(cls_name, impl):
    model, x = tiny(cls_name, impl), torch.randn(2, 1, 16, 16)
    ref = output(model, x)
    handle = quickmerge.patch(model, r=0)
    assert model.config._attn_implementation == "quickmerge_vit"
    assert torch.allclose(output(model, x), ref, atol=1e-5, rtol=0)
    handle.r = 12
    merged = output(model, x)
    assert handle.tokens_per_layer == [65, 53, 41]
    if cls_name != "ViTForImageClassification":
        assert merged.shape[1] == 29
        merged, ref_cls = merged[:, 0], ref[:, 0]
    else:
        ref_cls = ref
    assert not torch.allclose(merged, ref_cls, atol=1e-5)
    quickmerge.unpatch(model)
    assert model.config._attn_implementation == impl
    assert torch.equal(output(model, x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "Dinov2Model"])
def test_proportional_attention_makes_merging_duplicates_exact(cls_name, impl):
    model = tiny(cls_name, impl)
    with torch.no_grad():
        position_embeddings(model).zero_()
    x = torch.full((2, 1, 16, 16), -0.4)
    ref = output(model, x)[:, :1]  # logits, or the [CLS] state
    with quickmerge.patch(model, r=20, method="pool") as handle:
        assert torch.allclose(output(model, x)[:, :1], ref, atol=1e-5)
        handle.prop_attn = False
        assert not torch.allclose(output(model, x)[:, :1], ref, atol=1e-3)


@pytest.mark.parametrize("method", ["quickmerge", "tome", "random", "pool"])
def test_every_method_keeps_cls_alone_and_reaches_the_ratio(method):
    model = tiny("ViTForImageClassification", "sdpa")
    with quickmerge.patch(model, ratio=0.25, method=method, trace_source=True) as handle:
        logits = output(model, torch.randn(3, 1, 16, 16))
        assert torch.isfinite(logits).all()
        assert (handle.source[:, 0] == 0).all() and (handle.source[:, 1:] != 0).all()  # [CLS] alone
        assert handle.source.max() == 16  # 64 patches -> 16 kept, plus [CLS]


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
