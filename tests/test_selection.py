import torch

from quickmerge.selection import relaxed_topk_mask, select_tokens


def test_relaxed_mask_sums_to_k_and_keeps_sum_under_gradient():
    z = torch.randn(3, 50, requires_grad=True)
    mask = relaxed_topk_mask(z, 7, temperature=0.5)
    assert torch.allclose(mask.sum(-1), torch.full((3,), 7.0), atol=1e-3)
    assert mask.min() > 0 and mask.max() < 1
    mask.sum().backward(retain_graph=True)
    assert z.grad.abs().max() < 1e-5  # the sum is fixed at K: no direction changes it
    z.grad = None
    (mask * torch.randn(3, 50)).sum().backward()
    assert z.grad.abs().max() > 1e-3


def test_low_temperature_approaches_hard_top_k():
    z = torch.randn(2, 30)
    mask = relaxed_topk_mask(z, 5, temperature=1e-3)
    hard = torch.zeros_like(z).scatter_(1, z.topk(5).indices, 1.0)
    assert torch.allclose(mask, hard, atol=1e-3)


def test_eval_selection_is_hard_top_k_in_order():
    s = torch.rand(2, 20)
    mask, seeds = select_tokens(s, 4, temperature=0.1, floor=0.01, training=False)
    assert torch.equal(seeds, s.topk(4).indices.sort(-1).values)
    assert torch.equal(mask.sum(-1), torch.full((2,), 4.0))


def test_training_selection_samples_by_saliency():
    s = torch.tensor([[1.0, 1.0, 0.01, 0.01]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(200):
        _, seeds = select_tokens(s, 1, temperature=0.1, floor=0.01, training=True, generator=gen)
        counts[seeds[0, 0]] += 1
    assert counts[:2].sum() > 190  # sampled in proportion to saliency: ~99%
