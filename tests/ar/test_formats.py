"""Sequence formats: lengths, context + continuation, BOS, windows."""

import pytest
import torch

from quickmerge.ar.formats import IMAGE, VIDEO, SequenceFormat, to_pixels, to_sequences, windows
from quickmerge.ar.tokenizer import PatchCodebook

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_the_shipped_formats_have_long_contexts_and_add_up():
    for fmt in (IMAGE, VIDEO):
        assert fmt.context >= 512
        assert fmt.context + fmt.continuation + 1 == fmt.length
    assert IMAGE.continuation == 8 * 28  # the bottom 8 rows are scored
    assert VIDEO.continuation == VIDEO.tokens_per_frame  # the 4th frame is scored


def test_sequences_start_with_bos_and_decode_back():
    fmt = SequenceFormat("video", 8, 8, patch=4, codes=4, frames=2, context_frames=1, context_rows=0)
    frames = torch.randint(0, 256, (3, 2, 8, 8), dtype=torch.uint8)
    book = PatchCodebook.fit(frames.reshape(-1, 8, 8), 4, 4, seed=0)
    seq = to_sequences(frames, fmt, book)
    assert seq.shape == (3, fmt.length) and (seq[:, 0] == fmt.bos).all()
    assert torch.equal(seq[:, 1:5], book.encode(frames[:, 0]))
    assert torch.equal(to_pixels(seq[:, 1:], fmt, book), book.decode(book.encode(frames), 8, 8))
    with pytest.raises(ValueError, match="pixels"):
        to_sequences(frames[:, :1], fmt, book)


def test_windows_cut_every_step():
    video = torch.arange(7)[:, None, None].expand(7, 2, 2)
    w = windows(video, 3, 2)
    assert w.shape == (3, 3, 2, 2) and w[:, :, 0, 0].tolist() == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    with pytest.raises(ValueError, match="holds no window"):
        windows(video, 8, 1)
