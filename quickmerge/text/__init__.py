"""Token merging for Hugging Face causal LMs: presses used like kvpress's (``with press(model): ...``).

- :class:`KVPress`: the base of the KV-cache presses (hooks, cache bookkeeping, positions,
  proportional attention); a press is a dataclass overriding ``score()`` and/or ``merge()``.
- :class:`QuickMergePress`: QuickMerge++ merging of the KV cache (the method).
- :class:`ToMeKVPress`, :class:`RandomEvictionPress`: baselines in the same framework.
- :class:`QuickMergeInputPress`: merges the prompt's hidden states after one decoder layer.
- :func:`for_kvpress_pipeline`: a press that kvpress's pipeline keeps active while decoding.
- :class:`UnsupportedAttentionError`: raised for a layer whose queries and keys the presses cannot recompute.
"""

from .baseline_presses import RandomEvictionPress, ToMeKVPress
from .decoder import SUPPORTED_ARCHITECTURES, UnsupportedAttentionError
from .input_press import QuickMergeInputPress
from .kv_press import Compressed, KVPress
from .kvpress_pipeline import for_kvpress_pipeline
from .press import Press
from .quickmerge_press import QuickMergePress

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Compressed",
    "KVPress",
    "Press",
    "QuickMergeInputPress",
    "QuickMergePress",
    "RandomEvictionPress",
    "ToMeKVPress",
    "UnsupportedAttentionError",
    "for_kvpress_pipeline",
]
