"""Which merge rule stays closest to the unmerged SigLIP 2 NaFlex tower (benchmarks/siglip2_naflex.py's model),
judged on 5,000 training images (a development set: the test set is left to the benchmark).

    python benchmarks/exploration/siglip2_rules.py --out docs/results/siglip2_naflex/siglip2_rules_dev.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from siglip2_naflex import log_probs, naflex, train

from quickmerge.data.fashion_mnist import load_fashion_mnist
from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.vision import patch

RULES = {
    "tome": dict(method="tome"),
    "quickmerge (default: additive, weight 0.5)": dict(method="quickmerge"),
    "quickmerge additive, weight 0.1": dict(method="quickmerge", saliency_weight=0.1),
    "quickmerge scaled (weight 0.125)": dict(method="quickmerge", saliency_rule="scaled"),
    "quickmerge scaled, weight 0.03": dict(method="quickmerge", saliency_rule="scaled", saliency_weight=0.03),
    "quickmerge hidden similarity": dict(method="quickmerge", similarity="hidden"),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=Path("results/siglip2_naflex"))
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--r", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = train(args.model_dir, 4, 128, 1e-3, 0)  # loads the benchmark's trained model
    images = load_fashion_mnist("train")[0][-args.images:]
    batches = [naflex(images[i:i + 250]) for i in range(0, len(images), 250)]
    reference = log_probs(model, batches)
    kls = {}
    for r in args.r:
        for name, settings in tqdm(RULES.items(), desc=f"r={r}"):
            with patch(model.tower, r=r, **settings):
                merged = log_probs(model, batches)
            kls[(name, r)] = (reference.exp() * (reference - merged)).sum(-1).tolist()
    rows = [{"rule": name, "r": r, "kl": bootstrap_mean(kls[(name, r)]),
             "kl_minus_tome": bootstrap_difference(kls[(name, r)], kls[("tome", r)])} for name, r in kls]
    result = {"command": "python benchmarks/exploration/siglip2_rules.py " + " ".join(sys.argv[1:]),
              "images": f"the last {args.images} training images", "rows": rows,
              "note": "KL(unmerged || merged) in nats per image, mean and 95% bootstrap interval; kl_minus_tome "
                      "paired over the same images (below 0: closer to the unmerged model than ToMe-style)"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for row in rows:
        d = row["kl_minus_tome"]
        print(f"r={row['r']} {row['rule']:<45} KL {row['kl'][0]:.5f}  minus ToMe {d[0]:+.5f} [{d[1]:+.5f}, {d[2]:+.5f}]")


if __name__ == "__main__":
    main()
