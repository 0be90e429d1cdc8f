"""How the video input press's spans meet exact ties (stop 63): at its cut boundary, how many links tie exactly, and
how much the NLL of 12 held-out video windows moves when the ties are broken in another order (lowest position first,
latest first) instead of torch.topk's own (CPU) order. Explains why CPU and CUDA runs differ per window.

    .venv/bin/python benchmarks/exploration/spans_ties.py docs/results/gpu/spans_ties_cpu.json
"""
import json
import sys
import torch, statistics
import quickmerge.merging as M
from quickmerge.pretrained.ar_models import load_ar
from quickmerge.eval.generative import video_examples
from quickmerge.eval.generative_cli import ar_method
from quickmerge.eval.text import score_example
torch.set_num_threads(2)
model, tok, fmt = load_ar("video")
ex = video_examples(fmt, tok, 12)
stats = []
orig_topk = torch.Tensor.topk
mode = {"m": "orig"}
def spans(x, saliency, k, saliency_weight=1.0, cut_first=None):
    b, n, _ = x.shape
    xn = torch.nn.functional.normalize(x.detach(), dim=-1)
    link = (xn[:, :-1] * xn[:, 1:]).sum(dim=-1).float()
    s = saliency.detach().float()
    link = link - saliency_weight * torch.maximum(s[:, :-1], s[:, 1:])
    if cut_first is not None:
        link = link - (2.0 + saliency_weight) * cut_first.to(link.device, link.dtype)
    srt = link.sort(dim=-1).values
    stats.append(((srt[:, k-2] == srt[:, k-1]).float().mean().item(), (link == srt[:, k-2:k-1]).sum(-1).float().mean().item()))
    if mode["m"] == "orig":
        cuts = link.topk(k - 1, dim=-1, largest=False).indices
    elif mode["m"] == "first":
        cuts = link.sort(dim=-1, stable=True).indices[:, : k - 1]
    else:  # ties: the latest positions first
        cuts = (n - 2 - link.flip(-1).sort(dim=-1, stable=True).indices[:, : k - 1])
    starts = torch.zeros(b, n, dtype=torch.long, device=x.device).scatter_(1, cuts + 1, 1)
    return starts.cumsum(dim=1)
import quickmerge.text.input_press as IP
for name, val in vars(IP).items():
    if val is M.contiguous_spans: pass
M.contiguous_spans = spans
for attr in ("contiguous_spans",):
    if hasattr(IP, attr): setattr(IP, attr, spans)
method = ar_method("quickmerge-input-time", fmt)
res = {}
for m in ("orig", "first", "last"):
    mode["m"] = m
    for ratio in (0.5,):
        res[m] = [score_example(model, e, fmt.context, method.make(ratio), method, ratio)["nll"] for e in ex]
out = {"windows": [e.title for e in ex], "ratio": 0.5,
       "boundary_tied_share": [t[0] for t in stats[:len(ex)]], "tied_links_at_boundary": [t[1] for t in stats[:len(ex)]]}
base = [score_example(model, e, fmt.context, None, __import__("quickmerge.eval.text", fromlist=["x"]).NO_COMPRESSION)["nll"] for e in ex]
for m, v in res.items():
    out[m] = {"mean_nll_ratio_to_uncompressed": sum(v) / sum(base),
              "max_abs_nll_difference_vs_topk_order": max(abs(a - b) for a, b in zip(v, res["orig"]))}
print(json.dumps(out, indent=2))
open(sys.argv[1], "w").write(json.dumps(out, indent=2) + "\n")
