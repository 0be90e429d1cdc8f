import pytest
import torch

from quickmerge import BidirectionalARAlignment, CausalPrior

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_forward_prior_is_causal():
    prior = CausalPrior(8, hidden_dim=16, num_layers=2, num_heads=2)
    for p in prior.parameters():  # move off the zero-initialised head
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 10, 8)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 4, 8)
    a, b = prior(x), prior(y)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-5)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_untrained_prior_predicts_the_current_token():
    x = torch.randn(1, 5, 8)
    assert torch.equal(CausalPrior(8, hidden_dim=16, num_heads=2)(x), x)


def test_alignment_loss_is_sum_of_directions_and_backward_is_anticausal():
    align = BidirectionalARAlignment(8, hidden_dim=16, num_heads=2)
    for p in align.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 8, requires_grad=True)
    fwd, bwd = align.directional_losses(x)
    total = align.compute_alignment_loss(x)
    assert torch.allclose(total, fwd + bwd)
    total.backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in align.parameters())
    # The backward prior's prediction at t depends on tokens >= t only.
    y = x.detach().clone()
    y[:, :3] = torch.randn(3, 3, 8)
    back = lambda t: align.backward_prior(t.flip(1)).flip(1)  # noqa: E731
    assert torch.allclose(back(x.detach())[:, 3:], back(y)[:, 3:], atol=1e-5)


def test_single_token_gives_zero_loss_attached_to_graph():
    align = BidirectionalARAlignment(4, hidden_dim=8, num_heads=2)
    x = torch.randn(2, 1, 4, requires_grad=True)
    loss = align.compute_alignment_loss(x)
    assert loss.detach().item() == 0.0 and loss.requires_grad
    loss.backward()


def test_one_batched_pass_per_direction():
    align = BidirectionalARAlignment(4, hidden_dim=8, num_heads=2)
    calls = []
    for prior in (align.forward_prior, align.backward_prior):
        prior.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    align.compute_alignment_loss(torch.randn(5, 11, 4))
    assert calls == [(5, 11, 4), (5, 11, 4)]
