"""The replay score pass before and after stop 31, timed alternately in one process on SmolLM2's shapes.

    PYTHONPATH=. .venv/bin/python benchmarks/exploration/replay_attention_speed.py [--rounds 15] [--threads 2]

The old `replay_attention` is read from git (b8a3b6d). One call scores one layer: 9 query heads over 3 KV heads,
d = 64, a 1,024-token prompt replayed on top of itself (2,048 keys). Medians over the rounds, and their ratio.
"""

import argparse
import json
import statistics
import subprocess
import time
import types

import torch

from quickmerge.text.replay import replay_attention

OLD_COMMIT = "b8a3b6d"


def old_replay_attention():
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:quickmerge/text/replay.py"], capture_output=True,
                            text=True, check=True).stdout
    start = source.index("def replay_attention(")
    module = types.ModuleType("old_replay")
    exec("import torch\nfrom torch import Tensor\n" + source[start: source.index("def replay_scores(")],
         module.__dict__)
    return module.replay_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    length, heads, kv_heads, dim = 1024, 9, 3, 64
    queries = torch.randn(1, heads, length, dim) * 2
    keys = torch.randn(1, kv_heads, 2 * length, dim) * 2
    versions = {"before": old_replay_attention(), "after": replay_attention}
    times: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(args.rounds):
        for name, fn in versions.items():
            start = time.perf_counter()
            fn(queries, keys, length, dim**-0.5)
            times[name].append(time.perf_counter() - start)
    before, after = (versions[n](queries, keys, length, dim**-0.5) for n in ("before", "after"))
    result = {name: statistics.median(t) for name, t in times.items()}
    result.update(speedup=result["before"] / result["after"], threads=args.threads, rounds=args.rounds,
                  max_relative_difference=float(((before - after).abs() / before).max()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
