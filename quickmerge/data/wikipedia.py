"""English Wikipedia articles from the (shortened) dump that ships inside gensim's test data."""

from __future__ import annotations

import bz2
import functools
import importlib.util
import os
import re
from dataclasses import dataclass

from .._optional import require

_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class Article:
    """One article: its title and plain text (paragraphs separated by blank lines)."""

    title: str
    text: str


def dump_path() -> str:
    """Path of the bz2 XML dump inside the installed gensim package."""
    require("gensim", "text", "Loading Wikipedia text")
    path = os.path.join(os.path.dirname(importlib.util.find_spec("gensim").origin), "test", "test_data", _DUMP)
    if not os.path.exists(path):
        raise FileNotFoundError(f"gensim is installed but its Wikipedia dump is missing: {path}")
    return path


def clean_wikitext(raw: str) -> str:
    """Plain text from wiki markup: gensim's filter plus removal of bold/italic quotes and empty lines."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw).replace("'''", "").replace("''", "")
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if len(p.split()) >= 5)


@functools.lru_cache(maxsize=2)
def _load(min_words: int) -> tuple[Article, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(dump_path()) as handle:
        for title, raw, _ in extract_pages(handle):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            text = clean_wikitext(raw)
            if len(text.split()) >= min_words:
                articles.append(Article(title, text))
    return tuple(articles)


def wikipedia_articles(min_words: int = 200) -> list[Article]:
    """All non-redirect articles with at least ``min_words`` words, in dump order (~1.7 s, cached)."""
    return list(_load(int(min_words)))
