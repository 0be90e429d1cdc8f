import pytest

pytest.importorskip("gensim")

from quickmerge.data import wikipedia_articles
from quickmerge.data.wikipedia import clean_wikitext

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_articles_are_clean_real_text():
    articles = wikipedia_articles()
    assert len(articles) >= 50
    assert sum(len(a.text.split()) for a in articles) > 300_000
    first = articles[0]
    assert first.title == "Anarchism" and first.text.startswith("Anarchism is")
    assert all("'''" not in a.text and "[[" not in a.text for a in articles)


def test_clean_wikitext_strips_markup():
    raw = "'''Bold''' and ''italic'' words [[link|shown]] here ok"
    assert clean_wikitext(raw) == "Bold and italic words shown here ok"
