"""Saliency-direction and epsilon sweep on real MiniLM states (the ablation table of BENCHMARKS.md, issue 2).

Usage: python benchmarks/exploration/encoder_saliency_ablation.py
Plain and mass-weighted relative reconstruction error at K = N/4 over 40 Wikipedia windows.
"""

import statistics

import torch

from quickmerge import QuickMergePP
from quickmerge.baselines import tome_merge, uniform_pool
from quickmerge.data import wikipedia_articles
from quickmerge.demos.encoder_token_groups import relative_error
from quickmerge.pretrained.encoder import encode, load_encoder
from quickmerge.merging import merge_mass

torch.set_num_threads(2)
model, tok = load_encoder()
arts = wikipedia_articles()
res = {}
encs = []
for a in arts[:40]:
    ids = tok(a.text, add_special_tokens=False)["input_ids"][:254]
    encs.append(encode(model, tok, tok.decode(ids)))
for e in encs:
    x = e.hidden
    n = x.shape[1]
    K = n // 4
    for sal in ["high_entropy", "low_entropy"]:
        for src in ["attn", "xonly"]:
            for eps in [0.01, 0.1, 0.2, 0.5]:
                for causal in [False, True]:
                    qm = QuickMergePP(384, num_layers=6, epsilon=eps, causal=causal, salient=sal).eval()
                    with torch.no_grad():
                        r, s = qm.compress(x, K, attentions=e.attentions if src == "attn" else None)
                    w = merge_mass(r.mask, s, eps)
                    res.setdefault(f"{sal[:4]} {src} eps={eps} causal={causal}", []).append(
                        (relative_error(x, r.unmerge()), relative_error(x, r.unmerge(), w))
                    )
    for name, fn in [("tome", tome_merge), ("pool", uniform_pool)]:
        mm, aa, sz = fn(x, K)
        rec = mm.gather(1, aa[..., None].expand(-1, -1, 384))
        res.setdefault(name, []).append((relative_error(x, rec), 0))
for k, v in res.items():
    print(f"{k:38s} {statistics.mean(a for a, b in v):.4f} {statistics.mean(b for a, b in v):.4f}")
