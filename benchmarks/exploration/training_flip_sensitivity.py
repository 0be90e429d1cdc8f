"""How sensitive merge-aware training is on a tiny random timm ViT (r = 12, temperature 0.5), the basis of
tests/test_devices.py's training tolerances (stop 63): fp32 vs fp64 gradients, input perturbations of 1e-7..1e-3
(where a merge flips), another Gumbel seed (loss and gradient cosine), and the share of identical merges
(handle.source) for the same seed, another seed and a 1e-4 perturbation.

    .venv/bin/python benchmarks/exploration/training_flip_sensitivity.py
"""
import torch, timm, quickmerge
torch.manual_seed(0)
model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=2, in_chans=1, num_classes=5, embed_dim=32, depth=3, num_heads=4).train()
x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 5, (8,))
def step(model, x, y):
    with quickmerge.patch(model, r=12, temperature=0.5, seed=3) as h:
        loss = torch.nn.functional.cross_entropy(model(x), y)
    model.zero_grad(); loss.backward()
    return loss.detach(), {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
l32, g32 = step(model, x, y)
m64 = model.double()
l64, g64 = step(m64, x.double(), y)
print("loss", l32.item(), l64.item())
worst = []
for n in g32:
    d = (g32[n]-g64[n]).abs(); s = g64[n].abs()
    worst.append(((d - 1e-4 - 1e-3*s).max().item(), n, d.max().item(), s.max().item()))
for w in sorted(worst, reverse=True)[:6]: print(w)
print("--- perturbation sensitivity (fp64, x + 1e-6 noise)")
torch.manual_seed(1)
for eps in (1e-7, 1e-6, 1e-5):
    lp, gp = step(m64, (x + eps * torch.randn_like(x)).double(), y)
    worst = []
    for n in g64:
        d = (gp[n]-g64[n]).abs(); s = g64[n].abs()
        worst.append(((d - 1e-4 - 1e-3*s).max().item(), n, d.max().item(), s.max().item()))
    print(eps, "loss diff", (lp-l64).item(), sorted(worst, reverse=True)[:3])
print("--- cosine under flips")
for eps in (1e-5, 1e-4, 1e-3):
    lp, gp = step(m64, (x + eps * torch.randn_like(x)).double(), y)
    a = torch.cat([g64[n].flatten() for n in g64]); b = torch.cat([gp[n].flatten() for n in g64])
    print(eps, "loss", (lp-l64).item(), "cos", torch.nn.functional.cosine_similarity(a, b, dim=0).item(), "norm ratio", (b.norm()/a.norm()).item(),
          "cls cos", torch.nn.functional.cosine_similarity(g64["cls_token"].flatten(), gp["cls_token"].flatten(), dim=0).item())
# a different gumbel noise (seed) for comparison: what a device bug in the noise would give
def step_seed(model, x, y, seed):
    with quickmerge.patch(model, r=12, temperature=0.5, seed=seed):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    model.zero_grad(); loss.backward()
    return loss.detach(), {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
for seed in (4, 5):
    lp, gp = step_seed(m64, x.double(), y, seed)
    a = torch.cat([g64[n].flatten() for n in g64]); b = torch.cat([gp[n].flatten() for n in g64])
    print("seed", seed, "loss", (lp-l64).item(), "cos", torch.nn.functional.cosine_similarity(a, b, dim=0).item())

print("--- merges (handle.source) shared")
model.float()
def run(seed, xx=x):
    with quickmerge.patch(model, r=12, temperature=0.5, seed=seed, trace_source=True) as h:
        loss = torch.nn.functional.cross_entropy(model(xx), y)
        src = h.source.clone()
    return loss, src
l3, s3 = run(3); l3b, s3b = run(3); l4, s4 = run(4)
l3p, s3p = run(3, x + 1e-4*torch.randn_like(x))
print(s3.shape, s3.dtype)
def same(a, b): return (a.argmax(1) == b.argmax(1)).float().mean().item() if a.ndim == 3 else (a == b).float().mean().item()
print("same seed", same(s3, s3b), "other seed", same(s3, s4), "perturbed", same(s3, s3p))
