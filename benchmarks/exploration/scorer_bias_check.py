"""The learned saliency's per-block bias changed no merge: proof on the stop-45 fine-tunes.

The first version of :class:`~quickmerge.vision.TokenScorer` also had a bias per block. A score added
to every token alike cannot change which tokens merge, so it was removed. This loads each fine-tune's
saved ``token_scorer.safetensors`` (written with the bias), keeps its weights only, and scores
QuickMerge++ on all 10,000 test images at each r: every per-image hit must equal the hits file the
published report was made from.

    python benchmarks/exploration/scorer_bias_check.py --seeds 0 1 2   # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vision_finetune import correct_per_image

from quickmerge.data.fashion_mnist import load_fashion_mnist
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import TokenScorer
from quickmerge.vision.token_scorer import FILENAME


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--r", type=int, nargs="+", default=[40, 48])
    args = ap.parse_args()
    torch.set_num_threads(2)
    images, labels = load_fashion_mnist("test")
    for seed in args.seeds:
        directory = Path(f"results/ftls_s{seed}_quickmerge")
        saved = load_file(str(directory / FILENAME))
        scorer = TokenScorer(*saved["weight"].shape)
        with torch.no_grad():
            scorer.weight.copy_(saved["weight"])
        published = json.loads(Path(f"results/ftls_s{seed}_hits.json").read_text())["curves"]
        model = load_fashion_vit(directory)
        for r in args.r:
            hits = correct_per_image(model, images, labels, method="quickmerge", r=r, scorer=scorer)
            same = hits == published["fine-tuned quickmerge + quickmerge"][str(r)]
            bias = saved.get("bias")
            print(f"seed {seed} r={r}: max |bias| {float(bias.abs().max()) if bias is not None else 0:.1e}, "
                  f"hits without it identical on all {len(hits)} images: {same}")


if __name__ == "__main__":
    main()
