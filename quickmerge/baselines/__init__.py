"""Baselines quickmerge is measured against: ToMe-style bipartite matching, pooling, random
dropping, and the straightforward reference implementation of the spec's algorithm."""

from .pooling import random_drop, uniform_pool
from .tome import bipartite_round, tome_merge

__all__ = ["bipartite_round", "random_drop", "tome_merge", "uniform_pool"]
