"""k-means updates vs reconstruction error on real MiniLM states (BENCHMARKS.md, issue 2).

Usage: python benchmarks/exploration/kmeans_iters_sweep.py
"""
import torch, statistics
from quickmerge import QuickMergePP
from quickmerge.pretrained.encoder import load_encoder, encode
from quickmerge.data import wikipedia_articles
from quickmerge.demos.encoder_token_groups import relative_error
torch.set_num_threads(2)
model, tok = load_encoder()
res={}
for a in wikipedia_articles()[:40]:
    ids = tok(a.text, add_special_tokens=False)["input_ids"][:254]
    e = encode(model, tok, tok.decode(ids)); x=e.hidden; K=x.shape[1]//4
    for it in [0,1,2,3]:
        for src in ['attn','x']:
            r,_ = QuickMergePP(384, num_layers=6, kmeans_iters=it).eval().compress(x, K, attentions=e.attentions if src=='attn' else None)
            res.setdefault(f"it={it} {src}",[]).append(relative_error(x, r.unmerge()))
for k,v in res.items(): print(k, round(statistics.mean(v),4))
