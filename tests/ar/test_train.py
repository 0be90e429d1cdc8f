"""The autoregressive trainer: it learns, saves what loads back identically, and resumes after a kill."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from quickmerge.ar import train as train_module
from quickmerge.ar.formats import SequenceFormat
from quickmerge.ar.model import load_ar_model
from quickmerge.ar.tokenizer import PatchCodebook
from quickmerge.ar.train import ARRecipe, TokenData, train_ar

FMT = SequenceFormat("image", 4, 8, patch=1, codes=4, frames=1, context_frames=0, context_rows=2)
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 64}


def _data(n: int = 64):
    """Images whose rows repeat their first row: the rest of each image is predictable from its top."""
    gen = torch.Generator().manual_seed(0)
    first = torch.randint(0, 4, (n, 1, 8), generator=gen)
    ids = first.expand(n, 4, 8).reshape(n, -1)
    seqs = torch.cat([torch.full((n, 1), FMT.bos), ids], 1)
    book = PatchCodebook(torch.tensor([[0.0], [85.0], [170.0], [255.0]]), 1)
    return book, TokenData(FMT, [[seqs[:48]]], seqs[48:]), {"synthetic": "none"}


def test_training_learns_the_structure_and_the_saved_model_loads_back(tmp_path):
    recipe = ARRecipe(steps=200, batch_size=8, lr=1e-2, warmup_steps=10, save_every=100, heldout_sequences=16)
    summary = train_ar("image", tmp_path, recipe=recipe, sizes=TINY, data=_data())
    bits = summary["heldout_bits_per_token"]
    # First row: 2 bits per token (uniform over 4 codes); rows 2-4 are copies: 0 bits when learnt,
    # so 0.5 bits per token at best, 2.0 for a model that learnt nothing.
    assert bits < 1.0, bits
    model, book, fmt = load_ar_model(tmp_path)
    assert fmt == FMT and torch.equal(book.codebook, _data()[0].codebook)
    assert not (tmp_path / "checkpoint.pt").exists()
    held = _data()[1].heldout
    assert abs(train_module.bits_per_token(model, held) - bits) < 1e-3


def test_an_interrupted_training_resumes_to_the_same_model(tmp_path, monkeypatch):
    recipe = ARRecipe(steps=20, batch_size=4, warmup_steps=2, save_every=10, heldout_sequences=16)
    full = train_ar("image", tmp_path / "full", recipe=recipe, sizes=TINY, data=_data())
    calls, real = [], train_module.bits_per_token

    def killed_after_first_checkpoint(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "bits_per_token", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        train_ar("image", tmp_path / "part", recipe=recipe, sizes=TINY, data=_data())
    assert (tmp_path / "part" / "checkpoint.pt").exists()
    monkeypatch.setattr(train_module, "bits_per_token", real)
    resumed = train_ar("image", tmp_path / "part", recipe=recipe, sizes=TINY, data=_data())
    assert resumed["heldout_bits_per_token"] == pytest.approx(full["heldout_bits_per_token"], abs=1e-5)
    (tmp_path / "other").mkdir()
    torch.save({"identity": {"recipe": "another"}}, tmp_path / "other" / "checkpoint.pt")
    with pytest.raises(ValueError, match="fresh"):
        train_ar("image", tmp_path / "other", recipe=recipe, sizes=TINY, data=_data())


def test_bad_settings_are_refused_before_any_work():
    with pytest.raises(ValueError, match="modality"):
        train_ar("audio")
    with pytest.raises(ValueError, match="steps"):
        ARRecipe(steps=0)
