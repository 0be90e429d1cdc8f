"""The adapter registry: a new model family is one adapter class, registered in one place."""

import pytest
import torch
from torch import nn

import quickmerge
from quickmerge.vision import adapters
from quickmerge.vision.adapters import TimmViTAdapter, find_adapter, register_adapter

timm_vit = pytest.importorskip("timm.models.vision_transformer")


class WrappedViT(nn.Module):
    """A family quickmerge does not know: a timm ViT inside someone else's module."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = timm_vit.VisionTransformer(img_size=16, patch_size=2, in_chans=1, num_classes=5,
                                                   embed_dim=32, depth=3, num_heads=4).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class WrappedViTAdapter:
    name = "wrapped timm ViT"
    tested_classes = ("WrappedViT",)

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, WrappedViT)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return TimmViTAdapter().num_prefix_tokens(model.backbone)

    def has_class_token(self, model: nn.Module) -> bool:
        return TimmViTAdapter().has_class_token(model.backbone)

    def gradient_checkpointing(self, model: nn.Module) -> bool:
        return TimmViTAdapter().gradient_checkpointing(model.backbone)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return TimmViTAdapter().blocks(model.backbone)

    def attach(self, model, blocks, merger):
        return TimmViTAdapter().attach(model.backbone, blocks, merger)


@pytest.fixture
def registered():
    before = list(adapters.REGISTRY)
    register_adapter(WrappedViTAdapter())
    yield
    adapters.REGISTRY[:] = before


def test_an_unknown_family_raises_and_names_the_supported_ones():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        quickmerge.patch(WrappedViT())


def test_a_registered_adapter_patches_its_family(registered):
    model, x = WrappedViT(), torch.randn(2, 1, 16, 16)
    ref = model(x)
    assert isinstance(find_adapter(model), WrappedViTAdapter)
    with quickmerge.patch(model, r=8) as handle:
        model(x)
        assert handle.tokens_per_layer == [65, 57, 49]
    assert torch.equal(model(x), ref)


def test_register_checks_the_protocol():
    with pytest.raises(TypeError, match="attach"):
        register_adapter(type("Half", (), {"name": "x", "tested_classes": (), "matches": None,
                                           "num_prefix_tokens": None, "has_class_token": None,
                                           "gradient_checkpointing": None, "blocks": None})())


class VisionTransfomer(nn.Module):
    """A misspelt class no family matches: the refusal names the tested class it is nearest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_a_refusal_names_the_families_and_the_nearest_tested_classes_not_all_of_them():
    with pytest.raises(TypeError) as caught:
        quickmerge.patch(VisionTransfomer())
    message = str(caught.value)
    assert f"supports {len(adapters.REGISTRY)} model families" in message, message
    assert all(a.name in message for a in adapters.REGISTRY), message
    assert "supported_families()" in message and "nearest by name: VisionTransformer, " in message, message
    nearest = message.split("nearest by name: ")[1].split("; got")[0].split(", ")
    assert len(nearest) == len(set(nearest)), f"a name two families test is offered twice: {nearest}"
    assert "SiglipVisionModel" in adapters.supported_families() and "SiglipVisionModel" not in message, message
    assert len(message) < len(adapters.supported_families()) / 2, message  # the families' names, not every class


def test_a_language_or_vision_language_model_is_pointed_to_the_presses():
    """A class the presses support is refused with where its tokens do merge: the presses, and for a vision-language
    model its image tokens before the language model (its tower merged alone would break the projector's count)."""
    pytest.importorskip("transformers")
    from tests.text.tiny import tiny
    from tests.text.tiny_vlm import vision_language

    for model, image, clip in ((vision_language("llava").model, True, False), (tiny("llama"), False, False),
                               (vision_language("llava-next-video").model, True, True)):
        with pytest.raises(TypeError) as caught:
            quickmerge.patch(model)
        message = str(caught.value)
        assert "QuickMergePress merges its KV cache, QuickMergeInputPress its prompt's tokens" in message, message
        assert ("token_ids=(model.config.image_token_id,)" in message) == image, message
        assert ("(a clip's: video_token_id) and layer=-1" in message) == clip, message
    with pytest.raises(TypeError) as caught:
        quickmerge.patch(VisionTransfomer())
    assert "QuickMergePress" not in str(caught.value)


def test_the_hint_names_a_tested_base_class_or_nothing_when_nothing_is_near():
    class MyClassifier(timm_vit.VisionTransformer):
        pass

    model = MyClassifier(img_size=8, patch_size=2, in_chans=1, num_classes=2, embed_dim=16, depth=1, num_heads=2)
    assert adapters.family_hint(model).endswith("MyClassifier subclasses VisionTransformer, a tested class")
    assert "nearest" not in adapters.family_hint(nn.Linear(2, 2))


def test_a_class_of_a_tested_name_from_another_library_is_told_whose_class_was_tested():
    VisionTransformer = type("VisionTransformer", (nn.Module,), {"__module__": "vitlib.models"})
    with pytest.raises(TypeError) as caught:
        quickmerge.patch(VisionTransformer())
    message = str(caught.value)
    assert "the VisionTransformer tested is that of timm VisionTransformer, OpenCLIP VisionTransformer and " \
           "torchvision VisionTransformer (not vitlib.models)" in message, message
    assert "nearest by name" not in message, message
