"""The shipped reference ViT's runs on real test images, made once for the tests that compare a converted copy (in
torchvision's or Hugging Face's classes) with timm's."""

from dataclasses import dataclass, field

import pytest
import torch

import quickmerge


@dataclass
class ReferenceRuns:
    """timm's reference ViT (unpatched between calls), 256 normalised test images ``[256, 1, 28, 28]`` and its logits
    on them ``[256, 10]``; :meth:`patched` runs it patched, once per setting."""

    model: torch.nn.Module
    images: torch.Tensor
    logits: torch.Tensor
    _patched: dict = field(default_factory=dict)

    def patched(self, method: str, r: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Logits ``[256, 10]``, merged sizes and tokens per layer of the model patched with ``method`` and ``r``."""
        if (method, r) not in self._patched:
            with torch.inference_mode(), quickmerge.patch(self.model, r=r, method=method) as handle:
                self._patched[method, r] = (self.model(self.images), handle.sizes, list(handle.tokens_per_layer))
        return self._patched[method, r]


@pytest.fixture(scope="session")
def reference_runs() -> ReferenceRuns:
    pytest.importorskip("timm")
    from quickmerge.data import fashion_mnist as fm
    from quickmerge.pretrained.fashion_vit import load_fashion_vit

    if not (fm.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    model = load_fashion_vit()
    images = fm.normalize(fm.load_fashion_mnist("test")[0][:256])
    with torch.inference_mode():
        return ReferenceRuns(model, images, model(images))
