"""The shipped autoregressive image and video models: load, match their data and their recorded held-out bits."""

import json

import pytest
import torch

from quickmerge.pretrained.ar_models import ar_model_dir, load_ar

pytest.importorskip("transformers")


def _shipped(modality):
    directory = ar_model_dir(modality)
    if not (directory / "model.safetensors").is_file():
        pytest.skip(f"no shipped {modality} model")
    return directory


@pytest.mark.parametrize("modality", ["image", "video"])
def test_shipped_model_records_its_training_and_reproduces_its_heldout_bits(modality):
    from quickmerge.ar.train import bits_per_token, heldout_sequences

    directory = _shipped(modality)
    record = json.loads((directory / "training.json").read_text())
    assert (directory / "model.safetensors").stat().st_size < 8 * 2**20
    model, tokenizer, fmt = load_ar(modality)
    assert fmt.to_dict() == record["format"] and fmt.context >= 512
    bits = bits_per_token(model, heldout_sequences(fmt, tokenizer, record["recipe"]["heldout_sequences"]))
    assert bits == pytest.approx(record["heldout_bits_per_token"], abs=2e-3)
    chance = torch.log2(torch.tensor(float(fmt.codes))).item()
    assert bits < 0.6 * chance  # far from a model that learned nothing


@pytest.mark.parametrize("modality", ["image", "video"])
def test_data_matches_the_checksums_the_model_was_trained_on(modality):
    from quickmerge.data import fashion_mnist

    record = json.loads((_shipped(modality) / "training.json").read_text())
    current = fashion_mnist.checksums()
    if modality == "video":
        from quickmerge.data import video

        current = {**current, **video.checksums()}
    assert current == record["data_sha256"]


def test_missing_model_says_how_to_train(monkeypatch, tmp_path):
    import quickmerge.pretrained.ar_models as ar

    monkeypatch.setattr(ar, "ASSET_DIR", tmp_path)
    with pytest.raises(Exception, match="quickmerge train ar-image"):
        load_ar("image")
