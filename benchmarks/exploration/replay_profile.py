"""Where pooled replay scoring spends a 1,024-token SmolLM2 prefill (2 threads; 4 rounds, seconds per part).

    PYTHONPATH=. .venv/bin/python benchmarks/exploration/replay_profile.py

Each round times an uncompressed prefill, then one with `quickmerge-replay-pooled` with `replay_scores` (the
replay forward and its score pass), `replay_attention` (the score pass alone) and the press's `merge` wrapped.
"""

import collections
import time

import torch

from benchmarks.text_speed import long_ids, prefill
from quickmerge.eval.text_methods import OURS_PRESSES
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import quickmerge_press, replay

spent: dict[str, float] = collections.defaultdict(float)


def timed(owner: object, name: str, label: str) -> None:
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        spent[label] += time.perf_counter() - start
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = load_causal_lm()
    ids = long_ids(tokenizer, 1024)
    timed(replay, "replay_attention", "replay_attention")
    timed(quickmerge_press, "replay_scores", "replay_scores")
    timed(type(OURS_PRESSES["quickmerge-replay-pooled"](0.5)), "merge", "merge")
    for _ in range(4):
        spent.clear()
        plain, _, stack = prefill(model, ids, None)
        stack.close()
        pooled, _, stack = prefill(model, ids, OURS_PRESSES["quickmerge-replay-pooled"](0.5))
        stack.close()
        print(f"uncompressed {plain:.2f} s, pooled replay {pooled:.2f} s:",
              {k: round(v, 2) for k, v in spent.items()}, flush=True)


if __name__ == "__main__":
    main()
