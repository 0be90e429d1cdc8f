"""What ``keep_order=True`` adds to a merge step: the reference ViT's first block at 197 tokens, batch 256, r = 16,
``handle.merge`` alone with and without it, alternating every round (medians), for QuickMerge++ and ToMe-style;
and the first block's forward, timed in the same rounds, for the share of a block (stop 66).

    python benchmarks/exploration/keep_order_cost.py [--rounds 40] [--json results/s66/keep_order_cost.json]
"""

import argparse
import copy
import json
import statistics

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.timing import clock
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    device = torch.device("cpu")
    model = load_fashion_vit()
    images, _ = load_fashion_mnist("test")
    out = {"batch": args.batch, "r": args.r, "threads": 2, "rounds": args.rounds, "torch": torch.__version__,
           "rows": {}}
    with torch.inference_mode():
        x = model.norm_pre(model._pos_embed(model.patch_embed(normalize(images[: args.batch]))))
        block = copy.deepcopy(model.blocks[0])
        for method in ("quickmerge", "tome"):
            handle = patch(model, r=args.r, method=method)
            blk = model.blocks[0]
            handle.begin(x)
            residual = x + blk.ls1(blk.attn(blk.norm1(x)))
            q, k, scale = handle._pass.q, handle._pass.k, handle._pass.scale
            times = {"block": [], False: [], True: []}
            for i in range(args.rounds + 2):
                t0 = clock(device)
                block(x)
                times["block"].append(clock(device) - t0)
                for keep_order in ((False, True) if i % 2 == 0 else (True, False)):
                    handle.keep_order = keep_order
                    handle.begin(x)
                    handle.record_qk(q, k, scale)
                    t0 = clock(device)
                    handle.merge(0, residual)
                    times[keep_order].append(clock(device) - t0)
            handle.remove()
            block_s, plain, ordered = (statistics.median(times[key][2:]) for key in ("block", False, True))
            out["rows"][method] = {"block_ms": 1e3 * block_s, "merge_ms": 1e3 * plain,
                                   "merge_keep_order_ms": 1e3 * ordered, "extra_ms": 1e3 * (ordered - plain),
                                   "extra_share_of_block": (ordered - plain) / block_s,
                                   "merge_share_of_block": plain / block_s,
                                   "merge_keep_order_share_of_block": ordered / block_s}
            print(method, {k: round(v, 4) for k, v in out["rows"][method].items()}, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
