"""Merge-step cost inside a ViT block at 196 patch tokens (issue 4 target: <= 15% of a block).

Times, alternately in one run (medians): the reference ViT's first block forward on real
Fashion-MNIST embeddings (batch 256, 197 tokens), the merge step alone (handle.merge:
saliency, grouping, weighted means, size/source bookkeeping) for each method at r=16, and
the whole patched block (attention on 197 tokens, merge, MLP on 181). Every row is timed in
each round, the rows' order rotating (``--sequential``: each row's repeats in turn, as before
stop 66). ``--scorer DIR`` adds QuickMerge++ with the learned saliency of a fine-tune (``train vision --finetune ...
--learned-saliency``) as one more row; ``--hidden-scaled`` QuickMerge++ matching on the residual stream with the
scaled saliency rule (``patch(similarity="hidden", saliency_rule="scaled")``, the default since stop 72, named);
``--legacy-matching`` QuickMerge++ with the default before it (``similarity="keys", saliency_rule="additive"``);
``--keep-order`` QuickMerge++ and
ToMe-style with the tokens kept in patch order (``patch(keep_order=True)``).

    python benchmarks/vision_speed.py [--threads 2] [--batch 256] [--r 16] [--repeats 15] [--scorer DIR] \
        [--hidden-scaled] [--legacy-matching] [--keep-order] [--sequential] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics

import torch

from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize
from quickmerge.eval.timing import clock, cpu_counters, steal_share
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import TokenScorer, patch
from quickmerge.vision.patch import LEGACY_MATCHING


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each timed region ends with a synchronize)")
    ap.add_argument("--scorer", default=None, help="fine-tuned checkpoint holding token_scorer.safetensors")
    ap.add_argument("--hidden-scaled", action="store_true",
                    help="add QuickMerge++ with similarity='hidden' and saliency_rule='scaled'")
    ap.add_argument("--sequential", action="store_true",
                    help="time each row's repeats before the next row's (the protocol before stop 66); default: every "
                         "row in each round, the order rotating")
    ap.add_argument("--legacy-matching", action="store_true",
                    help="add QuickMerge++ with the default matching before stop 72 (keys, additive saliency)")
    ap.add_argument("--keep-order", action="store_true",
                    help="add QuickMerge++ and ToMe-style with keep_order=True (tokens in patch order)")
    args = ap.parse_args()
    rows = [(m, m, None, {}) for m in ("quickmerge", "tome", "random", "pool")]
    if args.scorer is not None:
        rows.insert(1, ("quickmerge + learned saliency", "quickmerge", TokenScorer.load(args.scorer), {}))
    if args.hidden_scaled:
        rows.insert(1, ("quickmerge hidden + scaled", "quickmerge", None,
                        {"similarity": "hidden", "saliency_rule": "scaled"}))
    if args.legacy_matching:
        rows.insert(1, ("quickmerge keys + additive", "quickmerge", None, dict(LEGACY_MATCHING)))
    if args.keep_order:
        rows[1:1] = [("quickmerge keep_order", "quickmerge", None, {"keep_order": True})]
        rows.insert(3, ("tome keep_order", "tome", None, {"keep_order": True}))
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_fashion_vit().to(device)
    images, _ = load_fashion_mnist("test")
    with torch.inference_mode():
        x = model.norm_pre(model._pos_embed(model.patch_embed(normalize(images[: args.batch]).to(device))))
        block = copy.deepcopy(model.blocks[0])  # unpatched copy, timed as is
        states = [prepare(copy.deepcopy(model), x, args.r, method, scorer, options)
                  for _, method, scorer, options in rows]
        before = cpu_counters()
        if args.sequential:  # each row's repeats, then the next row's (the protocol before stop 66)
            for state in states:
                for _ in range(args.repeats + 2):
                    time_once(state, block, x, device)
        else:  # every row in each round, the order rotating: rows see the same stretch of the machine's drift
            for i in range(args.repeats + 2):
                for k in [*range(i % len(states), len(states)), *range(i % len(states))]:
                    time_once(states[k], block, x, device)
        steal = steal_share(before, cpu_counters())
        results = {}
        for (name, *_), state in zip(rows, states, strict=True):
            state["handle"].remove()
            b, m, p = (statistics.median(state[key][2:]) for key in ("block", "merge", "patched"))
            results[name] = {"block_s": b, "merge_s": m, "merge_share_of_block": m / b, "patched_block_s": p,
                             "patched_block_over_block": p / b}
            print(f"{name:29s} block {1e3 * b:7.2f} ms  merge {1e3 * m:6.2f} ms = {100 * m / b:5.1f}% of a block;"
                  f"  patched block (r={args.r}) {1e3 * p:7.2f} ms = {p / b:.3f}x")
    info = {"tokens": x.shape[1], "batch": args.batch, "r": args.r, "threads": torch.get_num_threads(),
            "timing": "sequential" if args.sequential else "rounds",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "platform": platform.platform(), "steal_share": steal, "results": results}
    if steal is not None:
        print(f"steal: {steal:.1%} of the machine's CPU time while timing (/proc/stat)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


def prepare(model: torch.nn.Module, x: torch.Tensor, r: int, method: str, scorer: TokenScorer | None,
            options: dict) -> dict:
    """``model`` patched for one row, the first block's residual stream after attention on ``x`` and the captured
    queries and keys that its merge step reads; lists for the timings."""
    handle = patch(model, r=r, method=method, scorer=scorer, **options)
    blk = model.blocks[0]
    handle.begin(x)
    residual = x + blk.ls1(blk.attn(blk.norm1(x)))  # records q and k through the hooks
    return {"handle": handle, "blk": blk, "residual": residual, "r": r,
            "qk": (handle._pass.q, handle._pass.k, handle._pass.scale), "block": [], "merge": [], "patched": []}


def time_once(state: dict, block: torch.nn.Module, x: torch.Tensor, device: torch.device) -> None:
    """One timing of the unpatched block, the row's merge step alone and its whole patched block, in that order."""
    handle = state["handle"]
    t0 = clock(device)
    block(x)
    handle.begin(x)  # fresh pass state (the patched block below leaves its own)
    handle.record_qk(*state["qk"])
    t1 = clock(device)
    out = handle.merge(0, state["residual"])
    t2 = clock(device)
    state["blk"](x)  # the whole patched block: attention on N tokens, merge, MLP on N - r
    t3 = clock(device)
    assert out is not None and out.shape[1] == x.shape[1] - state["r"]
    state["block"].append(t1 - t0)
    state["merge"].append(t2 - t1)
    state["patched"].append(t3 - t2)


if __name__ == "__main__":
    main()
