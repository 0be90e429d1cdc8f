"""Real data shipped by installable packages (no downloads at run time)."""

from .wikipedia import Article, wikipedia_articles

__all__ = ["Article", "wikipedia_articles"]
