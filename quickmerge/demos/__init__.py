"""Demos of the ``quickmerge`` command, named by what they show.

- :mod:`.merged_kv_cache` (``quickmerge demo``, the main job): a real causal LM continues a
  Wikipedia article from a QuickMerge++-merged KV cache, next to kvpress's presses.
- :mod:`.encoder_token_groups` (``quickmerge demo-encoder``): which words of real text
  QuickMerge++ merges together, on the MiniLM encoder's states and attention.
"""
