"""Which tokens merged, image by image: record the merges of a run, or compare two records (a change's effect).

A change that should leave the merges alone (a faster formula that rounds differently) is checked by running this
script once with the code before it and once after (``PYTHONPATH`` pointing at each checkout), then comparing:

    PYTHONPATH=OLD python benchmarks/exploration/merge_maps.py record --model fashion-vit --r 16 48 --out old.pt
    PYTHONPATH=NEW python benchmarks/exploration/merge_maps.py record --model fashion-vit --r 16 48 --out new.pt
    python benchmarks/exploration/merge_maps.py compare old.pt new.pt [--json out.json]

``--model fashion-vit``: the shipped reference ViT on the 10,000 Fashion-MNIST test images; ``--model PATH``: a
``video_vit_fashion.py`` VideoMAE classifier on its test clips (``--clips``, seed 0, as its evaluation draws them).
The record holds, per r, each image's source map (``handle.source``: the output token each input token ended in,
the end state of every merge of the pass) and its predicted class. ``compare`` reports, per r, the images whose
map differs anywhere, those whose prediction differs, and both runs' top-1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def record(args: argparse.Namespace) -> None:
    import quickmerge
    from quickmerge.data.fashion_mnist import load_fashion_mnist, normalize

    torch.set_num_threads(args.threads)
    items, labels = load_fashion_mnist("test")
    if args.model == "fashion-vit":
        from quickmerge.pretrained.fashion_vit import load_fashion_vit

        model, x, y = load_fashion_vit().eval(), normalize(items), labels

        def forward(batch: torch.Tensor) -> torch.Tensor:
            return model(batch)
    else:
        import transformers

        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from video_vit_fashion import clips

        model = transformers.VideoMAEForVideoClassification.from_pretrained(args.model, attn_implementation="sdpa")
        model.eval()
        x, y = clips(items, labels, args.clips, seed=0)

        def forward(batch: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=batch).logits

    out = {"code": quickmerge.__file__, "labels": y, "runs": {}}
    with torch.inference_mode():
        for r in args.r:
            maps, preds = [], []
            with quickmerge.patch(model, r=r, trace_source=True) as handle:
                for i in range(0, len(x), args.batch):
                    preds.append(forward(x[i : i + args.batch]).argmax(-1))
                    maps.append(handle.source.to(torch.int16))
            out["runs"][r] = {"source": torch.cat(maps), "pred": torch.cat(preds)}
            print(f"r={r}: top-1 {(out['runs'][r]['pred'] == y).double().mean().item():.4f}", flush=True)
    torch.save(out, args.out)


def compare(args: argparse.Namespace) -> None:
    a, b = torch.load(args.first), torch.load(args.second)
    rows = []
    for r in a["runs"]:
        ra, rb = a["runs"][r], b["runs"][r]
        rows.append({"r": r, "images": len(ra["pred"]),
                     "maps_differ": int((ra["source"] != rb["source"]).any(dim=1).sum()),
                     "predictions_differ": int((ra["pred"] != rb["pred"]).sum()),
                     "top1_first": (ra["pred"] == a["labels"]).double().mean().item(),
                     "top1_second": (rb["pred"] == b["labels"]).double().mean().item()})
        print(rows[-1])
    if args.json:
        Path(args.json).write_text(json.dumps({"first": a["code"], "second": b["code"], "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--model", default="fashion-vit", help="fashion-vit, or a video_vit_fashion.py model directory")
    rec.add_argument("--r", type=int, nargs="+", default=[16, 48])
    rec.add_argument("--clips", type=int, default=1024)
    rec.add_argument("--batch", type=int, default=256)
    rec.add_argument("--threads", type=int, default=2)
    rec.add_argument("--out", required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("first")
    cmp.add_argument("second")
    cmp.add_argument("--json", default=None)
    args = ap.parse_args()
    record(args) if args.command == "record" else compare(args)


if __name__ == "__main__":
    main()
