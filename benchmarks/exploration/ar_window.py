"""Which observation window for QuickMergePress on an AR image / video model? Never on the evaluated examples.

Images: the first held-out training images; video: windows spread over the training clips.
Perplexity ratio to the uncompressed model at 0.5 and 0.75, with the kvpress press to beat.

    .venv/bin/python benchmarks/exploration/ar_window.py image --model results/ar_image
    .venv/bin/python benchmarks/exploration/ar_window.py video --model results/ar_video
    .venv/bin/python benchmarks/exploration/ar_window.py video --windows 256 320 352 380 384 --ratios 0.5 \
        --out docs/results/stop83/ar_video_window_wide.json     # stop 83: windows up to the whole budget
"""
import argparse
import json
import math
from pathlib import Path

import torch

from quickmerge.ar.formats import to_sequences
from quickmerge.eval.text import Method, TextExample, score_example
from quickmerge.eval.text_methods import build_method
from quickmerge.pretrained.ar_models import load_ar
from quickmerge.text import QuickMergePress

SETUPS = {  # windows to try, the press to beat, default examples
    "image": ((16, 28, 56, 112), "kvpress-lagkv", 40),
    "video": ((16, 64, 256), "kvpress-streaming-llm", 16),
}


def examples_for(modality: str, fmt, tok, count: int) -> list[TextExample]:
    if modality == "image":
        from quickmerge.ar.data import image_pixels

        ids = to_sequences(image_pixels("heldout")[:count], fmt, tok)
        return [TextExample(f"heldout-{i}", row) for i, row in enumerate(ids)]
    from quickmerge.ar.data import video_clips, video_windows

    windows, _ = video_windows(video_clips("train", fmt), fmt)
    pick = torch.linspace(0, len(windows) - 1, count).round().long()
    return [TextExample(f"train-{i}", row) for i, row in zip(pick.tolist(), to_sequences(windows[pick], fmt, tok))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modality", choices=sorted(SETUPS))
    ap.add_argument("--model", default=None, help="model directory (default: the shipped one)")
    ap.add_argument("--examples", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--windows", type=int, nargs="+", default=None, help="windows to try (default: the setup's)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75])
    args = ap.parse_args()
    windows, rival, count = SETUPS[args.modality]
    windows = args.windows or windows
    torch.set_num_threads(1)
    model, tok, fmt = load_ar(args.model or args.modality)
    examples = examples_for(args.modality, fmt, tok, args.examples or count)
    methods = {f"quickmerge-window{w}": Method(f"w{w}", lambda r, w=w: QuickMergePress(compression_ratio=r, window=w),
                                               decode_inside=True) for w in windows}
    methods[rival] = build_method(rival)
    base = [score_example(model, e, fmt.context, None, Method("none", lambda r: None))["nll"] for e in examples]
    out = {}
    for ratio in args.ratios:
        for name, m in methods.items():
            nll = [score_example(model, e, fmt.context, m.make(ratio), m, ratio)["nll"] for e in examples]
            out[f"{name}@{ratio}"] = math.exp(sum(nll) / len(nll) - sum(base) / len(base))
            print(name, ratio, round(out[f"{name}@{ratio}"], 4), flush=True)
    path = Path(args.out or f"docs/results/issue12/ar_{args.modality}_window.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    split = "heldout" if args.modality == "image" else "training clips"
    path.write_text(json.dumps({"examples": len(examples), "split": split, "ratio_to_uncompressed": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()
