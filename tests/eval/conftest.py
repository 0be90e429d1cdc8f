"""A tiny causal LM (random weights, a byte-level tokenizer) and a tiny Fashion-MNIST ViT (random weights) saved
to disk, for running the evaluation commands end to end in seconds."""

from __future__ import annotations

import pytest


def require_usable_kvpress() -> None:
    """Skip unless kvpress is installed and supports the installed transformers (kvpress 0.5.5: < 5.3)."""
    pytest.importorskip("kvpress")
    from quickmerge.eval.text_methods import kvpress_incompatibility

    if kvpress_incompatibility() is not None:
        pytest.skip(kvpress_incompatibility())


def save_tiny_lm(path) -> str:
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    import torch

    chars = {chr(c): c for c in range(256)}
    byte_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(chars, unk_token="?"))
    byte_level.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
    byte_level.normalizer = tokenizers.normalizers.Replace(tokenizers.Regex("[^\\x00-\\xff]"), "?")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level, unk_token="?", bos_token="\x01",
                                                     eos_token="\x02")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


TINY_AR = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "intermediate_size": 64}  # the AR image / video models' Llama, narrow and 2 layers deep


def fashion_test_images_installed() -> bool:
    from quickmerge.data.fashion_mnist import data_dir

    return (data_dir() / "t10k-images-idx3-ubyte.gz").is_file()


def save_tiny_ar(path, fmt, pixels):
    """A random ``TINY_AR`` model of format ``fmt`` and a codebook fitted on ``pixels``, saved as ``quickmerge train
    ar-image/ar-video`` saves; the codebook."""
    import torch

    from quickmerge.ar.model import build_ar_model, save_ar_model
    from quickmerge.ar.tokenizer import PatchCodebook

    torch.manual_seed(0)
    book = PatchCodebook.fit(pixels, fmt.codes, fmt.patch, seed=0)
    save_ar_model(build_ar_model(fmt, **TINY_AR).eval(), book, fmt, path)
    return book


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> str:
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


TINY_VIT = {"img_size": 28, "patch_size": 2, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 3,
            "num_heads": 2, "mlp_ratio": 2.0}  # the shipped ViT's 196 patch tokens, in 3 narrow blocks


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A directory with ``model.safetensors`` + ``config.json``, as ``eval vision --checkpoint`` reads."""
    import json

    import torch

    pytest.importorskip("timm")
    st = pytest.importorskip("safetensors.torch")
    from quickmerge.pretrained.fashion_vit import build_vit

    path = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    st.save_file(build_vit(TINY_VIT).state_dict(), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model": TINY_VIT}))
    return path
