"""The shipped Fashion-MNIST ViT: loads safely, matches its recorded accuracy, survives merging."""

import json

import pytest
import torch

from quickmerge.data import fashion_mnist as fm
from quickmerge.pretrained.fashion_vit import ASSET_DIR, load_fashion_vit

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

pytest.importorskip("timm")
needs_data = pytest.mark.skipif(not (fm.data_dir() / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist absent")


def test_checkpoint_ships_with_config_checksums_and_log():
    config = json.loads((ASSET_DIR / "config.json").read_text())
    assert set(config["data_sha256"]) == {n for f in fm.FILES.values() for n in f[:2]}
    assert (ASSET_DIR / "train_log.json").is_file()
    assert (ASSET_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    model = load_fashion_vit()
    assert model.patch_embed.num_patches == 196 and not model.training


def test_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="quickmerge train vision"):
        load_fashion_vit(tmp_path)


@needs_data
def test_data_matches_the_checksums_the_model_was_trained_on():
    config = json.loads((ASSET_DIR / "config.json").read_text())
    assert fm.checksums() == config["data_sha256"]


@needs_data
@torch.inference_mode()
def test_accuracy_matches_the_record_and_merging_keeps_it():
    import quickmerge

    config = json.loads((ASSET_DIR / "config.json").read_text())
    model = load_fashion_vit()
    images, labels = fm.load_fashion_mnist("test")
    images, labels = images[:1000], labels[:1000]

    def top1() -> float:
        return float((model(fm.normalize(images)).argmax(-1) == labels).float().mean())

    plain = top1()
    assert abs(plain - config["test_accuracy"]) < 0.03, (plain, config["test_accuracy"])
    with quickmerge.patch(model, r=16) as handle:
        merged = top1()
        assert handle.tokens_per_layer[-1] == 197 - 5 * 16
    assert merged > plain - 0.015, (plain, merged)


@needs_data
@torch.inference_mode()
def test_feature_maps_of_the_merged_model_are_its_tokens_unmerged():
    # what a dense head built on timm reads: the last block's normed tokens as a map, here from merged tokens
    import quickmerge
    from quickmerge.vision.adapters import mean_by_size

    model = load_fashion_vit()
    x = fm.normalize(fm.load_fashion_mnist("test")[0][:128])
    unmerged = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    assert unmerged.shape == (128, model.embed_dim, 14, 14)
    with quickmerge.patch(model, r=16, unmerge="copy") as handle:
        maps = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        tokens = model.forward_features(x)
        assert maps.shape == unmerged.shape and handle.tokens_per_layer[-1] == 197 - 5 * 16
        assert torch.equal(maps.flatten(2).transpose(1, 2), handle.expand_to_patches(tokens)[:, 1:])
        # each map's mean over its positions is the size-weighted mean of the merged patch tokens
        mean = mean_by_size(tokens[:, 1:], handle.sizes[:, 1:])
        assert torch.allclose(maps.mean(dim=(2, 3)), mean, atol=1e-5, rtol=0)
        # the default: each patch also gets back what its own residual stream lost at each merge
        handle.unmerge = "residual"
        last = []
        hook = model.blocks[-1].register_forward_hook(lambda _m, _a, out: last.append(out))
        residual = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
        hook.remove()
        want = model.norm(handle.expand_to_patches(last[0], residual=True))[:, 1:]
        assert torch.allclose(residual.flatten(2).transpose(1, 2), want, atol=1e-5, rtol=0)
    # merged yet close to the unmerged model's maps, patch by patch; the residual unmerge closer (with the default
    # matching 0.9950 -> 0.9982, with keys + additive 0.986 -> 0.994): it at least halves the distance left
    copied = torch.nn.functional.cosine_similarity(maps, unmerged, dim=1).mean()
    restored = torch.nn.functional.cosine_similarity(residual, unmerged, dim=1).mean()
    print(f"cosine to the unmerged maps: copy {copied:.4f}, residual {restored:.4f}")
    assert copied > 0.95 and 1 - restored < 0.5 * (1 - copied)
