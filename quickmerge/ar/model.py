"""The autoregressive image and video models: Hugging Face ``LlamaForCausalLM`` built from a config.

Being a stock Llama, every KV press (ours, kvpress's) applies to them unchanged. Grouped-query
attention (2 key-value heads) as in the real small LMs the text protocol uses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .._optional import require
from ..errors import MissingDataError
from .formats import SequenceFormat
from .tokenizer import PatchCodebook

SIZES: dict[str, int] = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "intermediate_size": 384}
TOKENIZER_FILE = "tokenizer.safetensors"
FORMAT_FILE = "format.json"


def build_ar_model(fmt: SequenceFormat, **sizes: int) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` for ``fmt`` (vocabulary ``fmt.vocab_size``)."""
    transformers = require("transformers", "text", "The autoregressive image/video models")
    unknown = set(sizes) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown model sizes {sorted(unknown)}; expected some of {sorted(SIZES)}")
    config = transformers.LlamaConfig(
        vocab_size=fmt.vocab_size, bos_token_id=fmt.bos, eos_token_id=None, pad_token_id=None,
        max_position_embeddings=2 * fmt.length, rope_theta=10_000.0, tie_word_embeddings=True,
        attention_bias=False, **{**SIZES, **sizes},
    )
    return transformers.LlamaForCausalLM(config)


def save_ar_model(model: Any, tokenizer: PatchCodebook, fmt: SequenceFormat, out: str | Path) -> None:
    """``model.safetensors`` + ``config.json`` (transformers), the codebook and the sequence format."""
    st = require("safetensors.torch", "vision", "Saving the autoregressive models")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    st.save_file({"codebook": tokenizer.codebook.contiguous()}, str(out / TOKENIZER_FILE),
                 metadata={"patch": str(tokenizer.patch)})
    (out / FORMAT_FILE).write_text(json.dumps(fmt.to_dict(), indent=2) + "\n")


def read_format(directory: str | Path) -> SequenceFormat:
    """The sequence format saved beside a model (``format.json``): its own geometry, whatever this version's
    defaults."""
    return SequenceFormat(**json.loads((Path(directory) / FORMAT_FILE).read_text()))


def load_ar_model(
    directory: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[Any, PatchCodebook, SequenceFormat]:
    """(model in eval mode, tokenizer, format) saved by :func:`save_ar_model`."""
    transformers = require("transformers", "text", "The autoregressive image/video models")
    st = require("safetensors", "vision", "Loading the autoregressive models")
    directory = Path(directory)
    for name in ("config.json", "model.safetensors", TOKENIZER_FILE, FORMAT_FILE):
        if not (directory / name).is_file():
            raise MissingDataError(
                f"{directory} holds no {name}: not a model saved by quickmerge train ar-image/ar-video")
    fmt = read_format(directory)
    with st.safe_open(str(directory / TOKENIZER_FILE), "pt") as f:
        tokenizer = PatchCodebook(f.get_tensor("codebook"), int(f.metadata()["patch"]))
    transformers.utils.logging.disable_progress_bar()  # as load_causal_lm: a 38-step bar per load says nothing
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return model, tokenizer, fmt
