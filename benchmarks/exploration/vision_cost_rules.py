"""Merge rules judged by fidelity (KL to the unmerged model), held-out images only.

    python benchmarks/exploration/vision_cost_rules.py --out results/vision_cost_rules.json   # ~25 min, 2 cores

QuickMerge++'s default lowers each bipartite edge's cosine similarity by ``0.5 x`` the source token's saliency rank:
an additive mix of two scales, which protects a salient token even from a merge with its near-duplicate, and
makes a less salient, less similar pair merge instead. A merge's error in what the class token reads grows with
the attention both tokens receive *times* how different they are, so this tries a multiplicative edge cost
``(1 - cos_ab) * (c + m * (s_a + s_b))`` (``s`` the entropy-weighted class-token saliency, summing to about 1 over the
``m`` mergeable tokens; ``c`` how much of ToMe-style's plain dissimilarity remains: c -> inf is ToMe-style): each A
token's partner is its cheapest B token, and the r cheapest A tokens merge. Also the additive rule at lower weights,
Ward's linkage (the dissimilarity times ``n_a n_b / (n_a + n_b)`` of the groups' sizes: merging two large groups
moves more patches than merging two single ones, which ToMe-style's matching ignores), with and without the
saliency factor, and saliency-weighted merge masses with ToMe-style's matching.
Every rule minus ToMe-style at the same r, per image, 95% paired bootstrap intervals: KL(unmerged || merged) in
nats and top-1 in points, on the last 5,000 training images (never trained on).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from quickmerge.eval.stats import bootstrap_difference, bootstrap_mean
from quickmerge.pretrained.fashion_vit import load_fashion_vit
from quickmerge.vision import patch
from quickmerge.vision.train import split_train_heldout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vision_fidelity import log_probs, per_image

module = sys.modules["quickmerge.vision.patch"]  # not the function quickmerge.vision exports under that name
default_assign = module.quickmerge_bipartite_assign
RULE: dict = {"cost": None, "ward": False, "metric": None, "handle": None, "x": None}


def cost_assign(metric: torch.Tensor, saliency: torch.Tensor, r: int, c: float | None, ward: bool,
                size: torch.Tensor | None) -> torch.Tensor:
    """``dst [B, m]``: one bipartite round, edge cost ``(1 - cos) * (c + m (s_a + s_b))`` (kept A first, then B).

    ``c`` None: no saliency factor. ``ward``: times ``n_a n_b / (n_a + n_b)`` of the tokens' sizes ``[B, m]`` (Ward's
    linkage: the growth of the within-group squared error when the two groups merge).
    """
    b, m, _ = metric.shape
    mn = F.normalize(metric.float(), dim=-1)
    a, bset = mn[:, ::2], mn[:, 1::2]
    ta, tb = a.shape[1], bset.shape[1]
    cost = 1.0 - a @ bset.transpose(1, 2)  # [B, ta, tb]
    if c is not None:
        s = saliency.float() * m
        cost = cost * (c + s[:, ::2, None] + s[:, None, 1::2])
    if ward:
        n = size.float() if size is not None else metric.new_ones(b, m, dtype=torch.float32)
        na, nb = n[:, ::2, None], n[:, None, 1::2]
        cost = cost * (na * nb / (na + nb))
    best, partner = cost.min(dim=-1)
    order = best.argsort(dim=-1)
    src, keep = order[:, :r], order[:, r:].sort(dim=-1).values
    kept = ta - r
    new_a = torch.empty(b, ta, dtype=torch.long, device=metric.device)
    new_a.scatter_(1, keep, torch.arange(kept, device=metric.device).expand(b, kept))
    new_a.scatter_(1, src, kept + partner.gather(1, src))
    dst = torch.empty(b, m, dtype=torch.long, device=metric.device)
    dst[:, ::2] = new_a
    dst[:, 1::2] = kept + torch.arange(tb, device=metric.device)
    return dst


def dispatch(metric, saliency, r, saliency_weight, keep_score=None, rule="additive"):
    handle = RULE["handle"]
    p = handle.num_prefix_tokens
    if RULE["metric"] == "concat":  # every head's keys side by side instead of their mean
        k = handle._pass.k
        metric = F.normalize(k.float(), dim=-1).transpose(1, 2).flatten(2)[:, p:]
    elif RULE["metric"] == "x":  # the residual stream that is merged
        metric = RULE["x"][:, p:]
    if RULE["cost"] is None and not RULE["ward"]:
        return default_assign(metric, saliency, r, saliency_weight, keep_score, rule)
    size = handle._pass.size  # sizes of the tokens entering this block's merge (None before any merge)
    size = None if size is None else size[:, handle.num_prefix_tokens:]
    return cost_assign(metric, saliency, r, RULE["cost"], RULE["ward"], size)


module.quickmerge_bipartite_assign = dispatch

RULES = [  # (label, method, cost c or None, Ward's size factor, patch options[, metric])
    ("tome", "tome", None, False, {}),
    ("quickmerge", "quickmerge", None, False, {}),
    ("weight 0", "quickmerge", None, False, {"saliency_weight": 0.0}),  # ToMe-style's matching, QuickMerge++'s code
    ("additive 0.25", "quickmerge", None, False, {"saliency_weight": 0.25}),
    ("additive 0.1", "quickmerge", None, False, {"saliency_weight": 0.1}),
    ("cost c=0.5", "quickmerge", 0.5, False, {}),
    ("cost c=2", "quickmerge", 2.0, False, {}),
    ("cost c=8", "quickmerge", 8.0, False, {}),
    ("ward", "quickmerge", None, True, {}),
    ("ward cost c=8", "quickmerge", 8.0, True, {}),
    ("mass eps=0.5", "quickmerge", None, False, {"saliency_weight": 0.0, "epsilon": 0.5}),
]
# part 3 (--set metrics): what the matching compares, with ToMe-style's rule (weight 0) or the best costs of part 2
METRIC_RULES = [
    ("tome", "tome", None, False, {}),
    ("keys concat", "quickmerge", None, False, {"saliency_weight": 0.0}, "concat"),
    ("hidden x", "quickmerge", None, False, {"saliency_weight": 0.0}, "x"),
    ("keys concat cost c=2", "quickmerge", 2.0, False, {}, "concat"),
    ("keys concat ward", "quickmerge", None, True, {}, "concat"),
]
# part 4 (--set combined): the residual stream as the metric, with saliency by the part-2 rules that kept close
COMBINED_RULES = [
    ("tome", "tome", None, False, {}),
    ("hidden x", "quickmerge", None, False, {"saliency_weight": 0.0}, "x"),
    ("hidden x scaled c=8", "quickmerge", 8.0, False, {}, "x"),
    ("hidden x additive 0.1", "quickmerge", None, False, {"saliency_weight": 0.1}, "x"),
]

SETS = {"costs": RULES, "metrics": METRIC_RULES, "combined": COMBINED_RULES}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--r", type=int, nargs="+", default=[16, 32, 48, 64, 88])
    ap.add_argument("--images", type=int, default=5000, help="the first N of the 5,000 held-out images")
    ap.add_argument("--set", choices=tuple(SETS), default="costs", help="part 2's rules, part 3's or part 4's")
    ap.add_argument("--rules", nargs="+", default=None, help="labels of the set's rules to run (default: all)")
    ap.add_argument("--out", default="results/vision_cost_rules.json")
    args = ap.parse_args()
    rules = [rule for rule in SETS[args.set] if args.rules is None or rule[0] in args.rules]
    torch.set_num_threads(2)
    model = load_fashion_vit().eval()
    _, (images, labels) = split_train_heldout()
    images, labels = images[: args.images], labels[: args.images].long()
    out = []
    with torch.inference_mode():
        base = log_probs(model, images)
        for r in tqdm(args.r, desc="r"):
            rows = {}
            for label, method, c, ward, options, *metric in rules:
                RULE.update(cost=c, ward=ward, metric=metric[0] if metric else None)
                with patch(model, r=r, method=method, **options) as handle:
                    RULE["handle"] = handle
                    merge = handle.merge
                    handle.merge = lambda layer, x, merge=merge: (RULE.update(x=x), merge(layer, x))[1]
                    rows[label] = per_image(log_probs(model, images, handle), base, labels)
            RULE.update(cost=None, ward=False, metric=None, handle=None, x=None)
            for label, values in rows.items():
                entry = {"r": r, "rule": label, "kl": bootstrap_mean(values["kl"].tolist()),
                         "top1": bootstrap_mean(values["top1"].tolist())}
                if label != "tome":
                    entry["minus_tome"] = {k: bootstrap_difference(values[k].tolist(), rows["tome"][k].tolist())
                                           for k in ("kl", "top1", "nll")}
                out.append(entry)
                d = entry.get("minus_tome", {})
                print(f"r={r:3d} {label:14s} KL {entry['kl'][0]:.5f} top1 {100 * entry['top1'][0]:.2f}"
                      + (f"  KL-tome {d['kl'][0]:+.5f} [{d['kl'][1]:+.5f}, {d['kl'][2]:+.5f}]"
                         f" top1-tome {100 * d['top1'][0]:+.2f} [{100 * d['top1'][1]:+.2f}, {100 * d['top1'][2]:+.2f}]"
                         if d else ""), flush=True)
    result = {"command": " ".join(["python", "benchmarks/exploration/vision_cost_rules.py", *sys.argv[1:]]),
              "images": len(images), "rows": out}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
