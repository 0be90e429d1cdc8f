"""A SentencePiece-BPE tokenizer rebuilt from a GGUF file's vocabulary (Gemma 3).

transformers 5.2 turns the ``llama``-type (SentencePiece) vocabulary of the Gemma 3 GGUF
into a Unigram model that splits text into single characters. SentencePiece BPE merges two
pieces when their concatenation is in the vocabulary, highest score first; GGUF stores the
pieces with those scores, so the merge list is recovered exactly as transformers does for
slow SentencePiece models: every split of every piece into two known pieces, ordered by the
piece's score. Bytes missing from the vocabulary fall back to ``<0xNN>`` tokens.
"""

from __future__ import annotations

from typing import Any

from .._optional import require

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def read_gguf_vocab(path: str) -> dict[str, Any]:
    """Pieces, scores, token types and special ids stored in a GGUF file."""
    gguf = require("gguf", "text", "Reading a GGUF vocabulary")
    reader = gguf.GGUFReader(path)

    def values(name: str) -> list:
        field = reader.fields[name]
        return [field.parts[i] for i in field.data]

    def scalar(name: str) -> Any:
        field = reader.fields.get(name)
        return None if field is None else field.parts[-1][0]

    model = bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode()
    if model != "llama":
        raise ValueError(f"{path}: expected a SentencePiece ('llama') vocabulary, found {model!r}")
    return {
        "pieces": [bytes(p).decode("utf-8") for p in values("tokenizer.ggml.tokens")],
        "scores": [float(p[0]) for p in values("tokenizer.ggml.scores")],
        "types": [int(p[0]) for p in values("tokenizer.ggml.token_type")],
        "bos": int(scalar("tokenizer.ggml.bos_token_id")),
        "eos": int(scalar("tokenizer.ggml.eos_token_id")),
        "unk": int(scalar("tokenizer.ggml.unknown_token_id")),
        "pad": int(scalar("tokenizer.ggml.padding_token_id")),
        "add_bos": bool(scalar("tokenizer.ggml.add_bos_token")),
        "add_space_prefix": bool(scalar("tokenizer.ggml.add_space_prefix")),
    }


def bpe_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges of a SentencePiece BPE vocabulary, highest-priority first."""
    rank = {p: i for i, p in enumerate(pieces) if types[i] == NORMAL}
    found = []
    for piece, i in rank.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in rank and right in rank:
                found.append((-scores[i], i, rank[left], rank[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def tokenizer_from_gguf(path: str) -> Any:
    """A ``PreTrainedTokenizerFast`` equivalent to the GGUF's SentencePiece BPE tokenizer."""
    tk = require("tokenizers", "text", "Building a tokenizer")
    transformers = require("transformers", "text", "Building a tokenizer")
    v = read_gguf_vocab(path)
    vocab = {p: i for i, p in enumerate(v["pieces"])}
    bpe = tk.models.BPE(vocab=vocab, merges=bpe_merges(v["pieces"], v["scores"], v["types"]),
                        unk_token=v["pieces"][v["unk"]], byte_fallback=True, fuse_unk=True)
    tok = tk.Tokenizer(bpe)
    steps = [tk.normalizers.Replace(" ", "▁")]
    if v["add_space_prefix"]:
        steps.insert(0, tk.normalizers.Prepend("▁"))
    tok.normalizer = tk.normalizers.Sequence(steps)
    tok.decoder = tk.decoders.Sequence([tk.decoders.Replace("▁", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()])
    special = [p for p, t in zip(v["pieces"], v["types"], strict=True) if t in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([tk.AddedToken(p, special=True, normalized=False) for p in special
                            if p.startswith("<") and p.endswith(">")])
    bos = v["pieces"][v["bos"]]
    if v["add_bos"]:
        tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, v["bos"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=v["pieces"][v["eos"]], unk_token=v["pieces"][v["unk"]],
        pad_token=v["pieces"][v["pad"]])
