"""Which QuickMergePress configuration for an AR image / video model at a ratio? Never on the evaluated examples.

Development examples outside every evaluated one: images, held-out training-split images (``image_pixels("heldout")``,
never trained on; ``eval image`` uses the test split); video, held-out windows after the first ``--first`` of the
order ``eval video`` takes them in (it uses the first 40). Perplexity ratio to the uncompressed model, per-example
NLLs kept for pairing. Variants are QuickMergePress keyword arguments written out ("window=256,proportional=False");
methods are eval names (``quickmerge-frame``, ``kvpress-streaming-llm``, ...).

    .venv/bin/python benchmarks/exploration/ar_variants.py video --first 40 --count 24 --ratios 0.5 \
        --methods quickmerge-frame kvpress-streaming-llm --variants "window=256,proportional=False"
"""
import argparse
import ast
import json
import math

import torch

from quickmerge.ar.formats import to_sequences
from quickmerge.eval.generative import video_examples
from quickmerge.eval.generative_cli import ar_method
from quickmerge.eval.text import Method, TextExample, score_example
from quickmerge.pretrained.ar_models import load_ar
from quickmerge.text import QuickMergePress


def dev_examples(modality: str, fmt, tok, first: int, count: int) -> list[TextExample]:
    if modality == "image":
        from quickmerge.ar.data import image_pixels

        ids = to_sequences(image_pixels("heldout")[first:first + count], fmt, tok)
        return [TextExample(f"heldout-{first + i}", row) for i, row in enumerate(ids)]
    return video_examples(fmt, tok, first + count)[first:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modality", choices=("image", "video"))
    ap.add_argument("--model", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--first", type=int, default=None, help="first dev example (default: image 0, video 40)")
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    ap.add_argument("--methods", nargs="*", default=[])
    ap.add_argument("--variants", nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, fmt = load_ar(args.model or args.modality)
    first = args.first if args.first is not None else (0 if args.modality == "image" else 40)
    examples = dev_examples(args.modality, fmt, tok, first, args.count)
    methods = {name: ar_method(name, fmt) for name in args.methods}
    for spec in args.variants:
        kw = {k: ast.literal_eval(v) for k, v in (item.split("=") for item in spec.split(","))}
        methods[spec] = Method(spec, lambda r, kw=kw: QuickMergePress(compression_ratio=r, **kw), decode_inside=True)
    base = [score_example(model, e, fmt.context, None, Method("none", lambda r: None))["nll"] for e in examples]
    out = {"modality": args.modality, "examples": [e.title for e in examples], "ratio_to_uncompressed": {},
           "per_example_nll": {"none": base}}
    for ratio in args.ratios:
        for name, m in methods.items():
            nll = [score_example(model, e, fmt.context, m.make(ratio), m, ratio)["nll"] for e in examples]
            key = f"{name}@{ratio}"
            out["per_example_nll"][key] = nll
            out["ratio_to_uncompressed"][key] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
            print(f"{key:70s} {out['ratio_to_uncompressed'][key]:.4f}", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
