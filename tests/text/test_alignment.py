"""Merged keys fitted to the window's log-sum-exp; values weighted by the attention they receive."""

import pytest
import torch

from quickmerge.primitives import weighted_mean
from quickmerge.text.alignment import fit_keys, fit_values, read_weights

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_fitted_keys_are_the_least_squares_fit_of_each_groups_log_sum_exp():
    torch.manual_seed(0)
    r, n, d, k, m, scale = 2, 24, 8, 6, 40, 0.5
    keys, queries = torch.randn(r, n, d), torch.randn(r, m, d)
    assignment = torch.arange(n).remainder(k).expand(r, n)
    mean, _ = weighted_mean(keys, torch.ones(r, n), assignment, k)
    sizes = torch.full((r, k), n / k)
    fitted = fit_keys(keys, assignment, mean, sizes, queries, scale, ridge=1e-7)
    full = scale * queries @ keys.transpose(1, 2)
    lse = torch.stack([full[..., assignment[0] == g].logsumexp(-1) for g in range(k)], -1)
    target = lse - torch.log(sizes)[:, None, :]  # proportional attention adds log(size) back
    residual = scale * queries @ fitted.transpose(1, 2) - target  # [R, M, K]
    # normal equations of the (unregularised) fit: the residual is orthogonal to every query direction
    assert (queries.transpose(1, 2) @ residual).abs().max() < 1e-3 * residual.abs().sum()
    plain = scale * queries @ mean.transpose(1, 2) - target
    assert residual.pow(2).sum() < 0.6 * plain.pow(2).sum()  # much closer than the plain mean key
    single = fit_keys(keys, torch.arange(n).expand(r, n), keys, torch.ones(r, n), queries, scale, ridge=0.1)
    assert torch.allclose(single, keys, atol=1e-4)  # a group of one keeps its key


def test_read_weights_follow_the_attention_and_values_average_within_groups():
    keys = torch.tensor([[[10.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    queries = torch.tensor([[[1.0, 0.0]]])
    w = read_weights(keys, queries, 1.0, floor=0.0)
    assert w[0, 0] > 0.99 and torch.allclose(w.sum(), torch.tensor(1.0))
    values = torch.tensor([[[1.0], [3.0], [5.0]]])
    merged = fit_values(values, torch.tensor([[0, 0, 1]]), 2, w)
    assert torch.allclose(merged[0, 0], torch.tensor([1.0]), atol=1e-3) and merged[0, 1] == 5.0


def test_a_capped_attention_keeps_each_groups_log_sum_exp_of_capped_logits():
    """Gemma 2 caps its logits (c tanh(x / c)) before adding log(size): with no more queries than dimensions the
    fit is exact in the capped domain."""
    torch.manual_seed(0)
    r, n, d, k, m, scale, cap = 2, 12, 8, 4, 6, 0.5, 3.0
    keys, queries = torch.randn(r, n, d), torch.randn(r, m, d)
    assignment = torch.arange(n).remainder(k).expand(r, n)
    mean, _ = weighted_mean(keys, torch.ones(r, n), assignment, k)
    sizes = torch.full((r, k), n / k)
    fitted = fit_keys(keys, assignment, mean, sizes, queries, scale, ridge=1e-7, softcap=cap)
    capped = cap * torch.tanh(scale * queries @ keys.transpose(1, 2) / cap)
    lse = torch.stack([capped[..., assignment[0] == g].logsumexp(-1) for g in range(k)], -1)
    merged = cap * torch.tanh(scale * queries @ fitted.transpose(1, 2) / cap) + torch.log(sizes)[:, None, :]
    assert torch.allclose(merged, lse, atol=1e-3), (merged - lse).abs().max()
    single = fit_keys(keys, torch.arange(n).expand(r, n), keys, torch.ones(r, n), queries, scale, ridge=0.1,
                      softcap=cap)
    assert torch.allclose(single, keys, atol=1e-3)  # a group of one keeps its key under the cap too


def test_read_weights_share_each_querys_softmax_with_its_sink_and_follow_the_cap():
    torch.manual_seed(0)
    keys, queries = torch.randn(1, 5, 4), torch.randn(1, 3, 4)
    sinks = torch.tensor([[4.0, -9.0, 0.0]])  # the first query mostly reads its sink
    logits = 2.0 * torch.tanh(queries @ keys.transpose(1, 2) / 2.0)
    probs = torch.cat([logits, sinks[..., None]], -1).softmax(-1)[..., :-1]
    expected = probs.sum(1) + 0.5 * probs.sum(1).mean(-1, keepdim=True)
    assert torch.allclose(read_weights(keys, queries, 1.0, 0.5, softcap=2.0, sinks=sinks), expected, atol=1e-6)
