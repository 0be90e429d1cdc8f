"""Microbenchmark of the pieces of a vision merge step (batch 256, 197 tokens, 4 heads), medians of 20.

    .venv/bin/python benchmarks/exploration/vision_merge_parts.py

q and k are strided views of one qkv tensor, as timm produces them.
"""
import torch, time
torch.set_num_threads(2)
from quickmerge.vision.token_merge import attention_saliency, rank01, quickmerge_bipartite_assign, merge_weighted
from quickmerge.baselines.tome import bipartite_round
B,H,N,hd = 256,4,197,32
qkv = torch.randn(B,N,3,H,hd).permute(2,0,3,1,4); q,k,_ = qkv.unbind(0); x = torch.randn(B,N,128)
def t(f, n=20):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    return sorted(ts)[n//2]*1e3
metric = k.mean(1)[:,1:]
sal = attention_saliency(q,k,0.17,None,"cls")[:,1:]
print("kmean", t(lambda: k.mean(1)[:,1:]))
print("saliency", t(lambda: attention_saliency(q,k,0.17,None,"cls")))
print("rank01", t(lambda: rank01(sal)))
print("bip", t(lambda: bipartite_round(metric, 16)))
print("qm bip", t(lambda: quickmerge_bipartite_assign(metric, sal, 16, 0.5)))
dst = bipartite_round(metric, 16)
print("merge_weighted", t(lambda: merge_weighted(x[:,1:], torch.ones(B,196), torch.ones(B,196), dst, 180)))
print("---")
print("kmean_t", t(lambda: k.transpose(1,2).mean(2)[:,1:]))
print("einsum", t(lambda: torch.einsum("bhd,bnhd->bhn", q[:, :, 0], k.transpose(1, 2))))
print("mulsum", t(lambda: (k.transpose(1, 2) * q[:, :, 0][:, None]).sum(-1)))
print("matmul", t(lambda: torch.matmul(q[:, :, :1], k.transpose(-1, -2))))
print("contig", t(lambda: k.contiguous()))
print("merge_weighted", t(lambda: merge_weighted(x[:,1:], torch.ones(B,196), torch.ones(B,196), dst, 180)))
print("merge_weighted", t(lambda: merge_weighted(x[:,1:], torch.ones(B,196), torch.ones(B,196), dst, 180)))
kc = k.contiguous()
print("kmean contiguous", t(lambda: kc.mean(1)[:, 1:]))
print("saliency contiguous", t(lambda: attention_saliency(q, kc, 0.17, None, "cls")))
