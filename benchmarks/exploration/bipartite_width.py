"""What one matching round costs by the width of what it compares, and by the CPU chunk size (stop 78).

    python benchmarks/exploration/bipartite_width.py [--json OUT]

``bipartite_round`` on ``[256, 196, C]`` random states (the reference ViT's batch and patch count) for C = 32
(ToMe-style's keys averaged over 4 heads) and 128 (QuickMerge++'s residual stream), with and without the scaled
rule's ``cost_scale``, at r = 16 / 48 / 98; then the 128-wide scaled round with the chunk size
(``_ELEMENTS_PER_CHUNK``) from a quarter to 100x the shipped one. Milliseconds per call, mean of 20 after a warm-up,
2 threads; one run, read as ratios within it.
"""

import argparse
import json

import torch

import quickmerge.baselines.tome as tome
from quickmerge.eval.timing import per_call_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    b, t = 256, 196
    states = {32: torch.randn(b, t, 32), 128: torch.randn(b, t, 128)}
    scale = torch.rand(b, t)
    widths = []
    for r in (16, 48, 98):
        row = {"r": r}
        for c, x in states.items():
            row[f"width_{c}"] = per_call_ms(lambda x=x, r=r: tome.bipartite_round(x, r), 20)
            row[f"width_{c}_scaled"] = per_call_ms(lambda x=x, r=r: tome.bipartite_round(x, r, cost_scale=scale), 20)
        widths.append(row)
        print({k: round(v, 2) for k, v in row.items()})
    shipped, chunks = tome._ELEMENTS_PER_CHUNK, []
    try:
        for factor in (0.25, 0.5, 1, 2, 4, 8, 100):
            tome._ELEMENTS_PER_CHUNK = int(shipped * factor)
            images = tome.images_per_chunk(b, t, 128, True)
            chunks.append({"factor": factor, "images_per_chunk": images,
                           "ms": per_call_ms(lambda: tome.bipartite_round(states[128], 48, cost_scale=scale), 20)})
            print(chunks[-1])
    finally:
        tome._ELEMENTS_PER_CHUNK = shipped
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": 2, "widths": widths, "chunks": chunks}, f, indent=2)


if __name__ == "__main__":
    main()
