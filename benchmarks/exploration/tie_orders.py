"""Which exactly tied links the video input press along time (`quickmerge-input-time`) cuts: four tie orders on
development windows only (stop 64, docs/results/issue12/tie_order_plan.md, amendment).

- ``topk``: torch.topk's own order on the CPU (the code before stop 64; another order on CUDA);
- ``lowest``: the lowest position in the time-major order the spans run in (the first locations of the frame first);
- ``earliest``: the earliest position in the model's token order (the oldest frame's links, across the frame, first);
- ``latest``: the reverse (the most recent frames' links first).

Development windows: the held-out windows after the 40 that ``eval video`` scores (ar_variants.py's convention).

    .venv/bin/python benchmarks/exploration/tie_orders.py --count 48 --out docs/results/issue12/tie_orders_dev.json
"""
import argparse
import json
import math

import torch

import quickmerge.text.input_press as input_press
from quickmerge.eval.generative_cli import ar_method
from quickmerge.eval.text import Method, score_example
from quickmerge.merging import contiguous_spans, frame_location, time_major_order
from quickmerge.pretrained.ar_models import load_ar

ORDERS = ("topk", "lowest", "earliest", "latest")


def spans_along_time_with(rule: str):
    def spans(x, saliency, k, period, offset=0, saliency_weight=1.0):
        n = x.shape[1]
        order = time_major_order(n, period, offset, x.device)
        location = frame_location(n, period, offset, x.device)[order]
        boundaries = location[1:] != location[:-1]
        xs, ss = x[:, order], saliency[:, order]
        if rule == "topk":  # the pre-stop-64 body of contiguous_spans
            xn = torch.nn.functional.normalize(xs, dim=-1)
            link = (xn[:, :-1] * xn[:, 1:]).sum(dim=-1).float()
            link = link - saliency_weight * torch.maximum(ss[:, :-1].float(), ss[:, 1:].float())
            link = link - (2.0 + saliency_weight) * boundaries.to(link.dtype)
            cuts = link.topk(k - 1, dim=-1, largest=False).indices
            out = torch.zeros(x.shape[0], n, dtype=torch.long).scatter_(1, cuts + 1, 1).cumsum(dim=1)
        else:
            rank = {"lowest": None, "earliest": order[:-1], "latest": -order[:-1]}[rule]
            out = contiguous_spans(xs, ss, k, saliency_weight, cut_first=boundaries, tie_rank=rank)
        return torch.empty_like(out).scatter_(1, order.expand_as(out), out)

    return spans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--first", type=int, default=40)
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from quickmerge.eval.generative import video_examples

    model, tok, fmt = load_ar("video")
    examples = video_examples(fmt, tok, args.first + args.count)[args.first:]
    method = ar_method("quickmerge-input-time", fmt)
    base = [score_example(model, e, fmt.context, None, Method("none", lambda r: None))["nll"] for e in examples]
    out = {"what": __doc__.splitlines()[0], "examples": [e.title for e in examples], "per_example_nll": {"none": base},
           "ratio_to_uncompressed": {}, "mean_over_ratios": {}}
    original = input_press.spans_along_time
    try:
        for rule in ORDERS:
            input_press.spans_along_time = spans_along_time_with(rule)
            for ratio in args.ratios:
                nll = [score_example(model, e, fmt.context, method.make(ratio), method, ratio)["nll"] for e in examples]
                key = f"{rule}@{ratio}"
                out["per_example_nll"][key] = nll
                out["ratio_to_uncompressed"][key] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
                print(f"{key:20s} {out['ratio_to_uncompressed'][key]:.4f}", flush=True)
            out["mean_over_ratios"][rule] = sum(out["ratio_to_uncompressed"][f"{rule}@{r}"] for r in args.ratios) / len(
                args.ratios)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2)
    finally:
        input_press.spans_along_time = original
    print(json.dumps(out["mean_over_ratios"], indent=2))


if __name__ == "__main__":
    main()
