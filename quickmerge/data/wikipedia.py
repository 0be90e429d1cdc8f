"""English Wikipedia articles from the (shortened) dump that ships inside gensim's test data."""

from __future__ import annotations

import bz2
import contextlib
import functools
import importlib.util
import os
import re
from dataclasses import dataclass

from .._cache import cache_dir, write_text_atomic
from ..errors import MissingDataError, MissingExtraError

_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


@dataclass(frozen=True)
class Article:
    """One article: its title and plain text (paragraphs separated by blank lines)."""

    title: str
    text: str


def dump_path() -> str:
    """Path of the bz2 XML dump inside the installed gensim package."""
    spec = importlib.util.find_spec("gensim")  # found, not imported: the cached text needs no gensim
    if spec is None or spec.origin is None:
        raise MissingExtraError("Loading Wikipedia text needs the 'gensim' package: pip install 'quickmerge[text]'")
    path = os.path.join(os.path.dirname(spec.origin), "test", "test_data", _DUMP)
    if not os.path.exists(path):
        raise MissingDataError(f"gensim is installed but its Wikipedia dump is missing: {path}")
    return path


def clean_wikitext(raw: str) -> str:
    """Plain text from wiki markup: gensim's filter plus removal of bold/italic quotes and empty lines."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw).replace("'''", "").replace("''", "")
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if len(p.split()) >= 5)


@functools.lru_cache(maxsize=2)
def _load(min_words: int) -> tuple[Article, ...]:
    """The articles, parsed once per dump and kept as JSON under the quickmerge cache directory."""
    import hashlib
    import json

    dump = dump_path()
    stat = os.stat(dump)
    key = hashlib.sha256(f"{dump}|{stat.st_size}|{stat.st_mtime_ns}|{min_words}|v1".encode()).hexdigest()[:16]
    cached = cache_dir() / "wikipedia" / f"{key}.json"
    try:
        return tuple(Article(**a) for a in json.loads(cached.read_text()))
    except (OSError, ValueError, TypeError):
        pass  # absent or unreadable: parse the dump again
    articles = _parse(dump, min_words)
    with contextlib.suppress(OSError):  # a read-only cache only costs the parse next time
        write_text_atomic(cached, json.dumps([a.__dict__ for a in articles]))
    return articles


def _parse(dump: str, min_words: int) -> tuple[Article, ...]:
    from gensim.corpora.wikicorpus import extract_pages

    articles = []
    with bz2.open(dump) as handle:
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
