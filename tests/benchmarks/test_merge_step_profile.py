"""The merge-step profile labels the pieces QuickMerge++ and ToMe-style really call, and puts them back after."""

import pytest
import torch

from benchmarks import merge_step_profile as profile

transformers = pytest.importorskip("transformers")


def small_videomae() -> torch.nn.Module:
    config = transformers.VideoMAEConfig(image_size=16, patch_size=8, num_channels=1, num_frames=4, tubelet_size=2,
                                         hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, num_labels=3, use_mean_pooling=True,
                                         attn_implementation="sdpa")
    return transformers.VideoMAEForVideoClassification(config).eval()


def test_each_method_shows_the_pieces_it_calls():
    model, x = small_videomae(), torch.randn(4, 4, 1, 16, 16)  # 8 tokens per clip
    before = {(module, name): getattr(module, name) for module, names in profile.PIECES for name in names}
    with profile.labelled_pieces():
        tome, _ = profile.profile_method(model, x, "tome", r=2, forwards=1)
        ours, _ = profile.profile_method(model, x, "quickmerge", r=2, forwards=1)
        additive, _ = profile.profile_method(model, x, "quickmerge", r=2, forwards=1, similarity="keys",
                                             saliency_rule="additive")
    assert all(getattr(module, name) is fn for (module, name), fn in before.items())
    for times in (tome, ours):
        assert times[profile.FORWARD] > times["merge step (whole)"] > times["weighted_mean"] > 0
        assert times["bipartite_round"] > 0
    assert tome["tome_assign"] > 0 and tome["attention_saliency"] == tome["removal_penalty"] == 0
    assert ours["tome_assign"] == 0
    assert ours["attention_saliency"] > 0 and ours["scaled_cost"] > 0 and ours["quickmerge_bipartite_assign"] > 0
    assert ours["removal_penalty"] == 0  # the default rule scales the costs; the additive one subtracts a penalty
    assert additive["removal_penalty"] > 0 and additive["scaled_cost"] == 0


def test_a_timm_vit_is_called_on_its_images_and_profiled_alike():
    # --family fashion-vit: a timm model takes the images positionally (no pixel_values)
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2).eval()
    x = torch.randn(4, 3, 32, 32)  # 16 patches and the class token
    with profile.labelled_pieces():
        tome, _ = profile.profile_method(model, x, "tome", r=4, forwards=1)
        ours, _ = profile.profile_method(model, x, "quickmerge", r=4, forwards=1)
    assert tome["tome_assign"] > 0 and tome["attention_saliency"] == 0
    assert ours["quickmerge_bipartite_assign"] > 0 and ours["attention_saliency"] > 0 and ours["tome_assign"] == 0


def test_operators_of_the_unpatched_and_the_patched_forward():
    # --operators: the costliest operators' self time, for comparing one family's forward with another's
    model, x = small_videomae(), torch.randn(4, 4, 1, 16, 16)
    with profile.labelled_pieces():
        pieces, ops = profile.profile_method(model, x, None, r=2, forwards=2, operators=3)
        _, merged_ops = profile.profile_method(model, x, "tome", r=2, forwards=1, operators=50)
    assert pieces["merge step (whole)"] == 0 and pieces[profile.FORWARD] > 0  # unpatched: nothing merges
    assert len(ops) == 3 and all(name.startswith("aten::") for name in ops)
    assert list(ops.values()) == sorted(ops.values(), reverse=True) and min(ops.values()) > 0
    assert "aten::argsort" in merged_ops or "aten::sort" in merged_ops  # the matching ranks its edges
