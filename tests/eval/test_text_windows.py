"""The Wikipedia windows of ``eval text``: openings first, then later windows of the same articles."""

import pytest
import torch

from quickmerge.data import wikipedia_articles
from quickmerge.eval.text import wikipedia_windows


class BytesTokenizer:
    """One token per UTF-8 byte: deterministic and fast, enough to check how windows are cut."""

    bos_token_id = 256

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": list(text.encode())}


@pytest.mark.parametrize("bos", [False, True])
def test_openings_come_first_then_the_next_windows_without_overlap(bos):
    tok, context, continuation = BytesTokenizer(), 6000, 100
    need = context + continuation + 1
    body = need - bos
    texts = {a.title: a.text.encode() for a in wikipedia_articles()}
    openings = [t for t, b in texts.items() if len(b) >= body]
    seconds = [t for t, b in texts.items() if len(b) >= 2 * body]
    assert 0 < len(seconds) < len(openings)  # this setting exercises both passes

    windows = wikipedia_windows(tok, len(openings) + 2, context, continuation, bos=bos)
    assert [w.title for w in windows[: len(openings)]] == openings
    assert [w.title for w in windows[len(openings) :]] == [f"{t} (window 2)" for t in seconds[:2]]
    for w in windows:
        assert w.ids.shape == (need,)
        assert (w.ids[0].item() == tok.bos_token_id) == bos
    first, second = windows[openings.index(seconds[0])], windows[len(openings)]
    text = torch.tensor(list(texts[seconds[0]]))
    assert torch.equal(first.ids[bos:], text[:body])
    assert torch.equal(second.ids[bos:], text[body : 2 * body])  # the next tokens, no overlap, no gap
    # asking for fewer windows never changes the first ones
    assert [w.title for w in wikipedia_windows(tok, 3, context, continuation, bos=bos)] == openings[:3]


def test_asking_for_more_windows_than_the_articles_hold_names_the_count():
    with pytest.raises(ValueError, match=r"hold only \d+ windows of 200001 tokens"):
        wikipedia_windows(BytesTokenizer(), 10, 200000, 0)


def test_more_windows_than_the_articles_hold_is_one_line(tiny_lm_dir, tmp_path, refused):
    """``eval text --examples`` past the articles' windows was a ValueError traceback; it is refused in one line."""

    refused(["eval", "text", "--model", tiny_lm_dir, "--examples", "100000000", "--ratios", "0.5",
            "--methods", "random", "--out", str(tmp_path / "res"), "--threads", "1"],
            "^quickmerge eval text: error: the Wikipedia articles hold only")
