import pytest
import torch

from quickmerge.primitives import (
    attention_received,
    focus,
    gather_rows,
    group_sum,
    normalized_entropy,
    quantile_rank,
    rank01,
    top_indices,
    weighted_mean,
)

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_weighted_mean_matches_a_loop_and_skips_dropped_tokens():
    b, n, c, k = 2, 12, 5, 4
    x, w = torch.randn(b, n, c), torch.rand(b, n) + 0.1
    dst = torch.randint(0, k, (b, n))
    dst[:, :k] = torch.arange(k)
    dst[0, -1] = -1  # dropped
    merged, total = weighted_mean(x, w, dst, k)
    for i in range(b):
        for g in range(k):
            m = dst[i] == g
            want = (w[i, m, None] * x[i, m]).sum(0) / w[i, m].sum()
            assert torch.allclose(merged[i, g], want, atol=1e-6)
            assert torch.allclose(total[i, g], w[i, m].sum())
    assert torch.allclose(total.sum(), w.sum() - w[0, -1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weighted_mean_keeps_the_dtype_and_accumulates_in_at_least_float32(dtype):
    x = torch.full((1, 4096, 2), 1.001, dtype=dtype)
    merged, total = weighted_mean(x, torch.ones(1, 4096), torch.zeros(1, 4096, dtype=torch.long), 1)
    assert merged.dtype == dtype and total.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.allclose(merged.double(), x[:, :1].double(), rtol=1e-3)  # a half-precision sum of 4096 would not


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_is_the_row_gather_and_passes_gradients(dtype):
    x = torch.randn(3, 5, 4, dtype=dtype, requires_grad=True)
    index = torch.tensor([[4, 0, 0, 2, 1, 3], [1, 1, 1, 1, 1, 1], [0, 2, 4, 3, 1, 0]])
    rows = gather_rows(x, index)
    assert rows.dtype == dtype and torch.equal(rows, x.gather(1, index[..., None].expand(-1, -1, 4)))
    rows.sum().backward()
    counts = torch.zeros(3, 5).scatter_add_(1, index, torch.ones(3, 6))  # times each row was taken
    assert torch.equal(x.grad.float(), counts[..., None].expand(-1, -1, 4))


def test_group_sum_adds_into_groups():
    values = torch.arange(6.0).view(1, 6, 1)
    out = group_sum(values, torch.tensor([[0, 1, 0, 2, 2, 1]]), 3)
    assert out.flatten().tolist() == [2.0, 6.0, 7.0]


def test_entropy_focus_and_received_attention():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(normalized_entropy(probs, 4), torch.tensor([0.0, 1.0]))
    assert torch.allclose(focus(probs, 4), torch.tensor([1.0, 0.0]))
    assert normalized_entropy(torch.tensor([1.0]), 1) == 0  # a single visible key: no uncertainty
    # the focused query's key gets its full weight, the uniform one's spreads
    assert torch.allclose(attention_received(probs, focus(probs, 4)), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.allclose(attention_received(probs, torch.ones(2)), torch.tensor([1.25, 0.25, 0.25, 0.25]))


def test_rank01():
    assert torch.equal(rank01(torch.tensor([[3.0, 1.0, 2.0]])), torch.tensor([[1.0, 0.0, 0.5]]))


def test_quantile_rank_is_in_unit_interval_per_row():
    got = quantile_rank(torch.tensor([[[3.0, 1.0, 2.0], [0.5, 0.7, 0.1]]]))
    assert torch.allclose(got, torch.tensor([[[1.0, 1 / 3, 2 / 3], [2 / 3, 1.0, 1 / 3]]]))


def _ranks_by_the_rule(row: list[float]) -> list[int]:
    """Rank of each entry: how many entries are smaller, plus how many tied entries stand after it."""
    n = len(row)
    return [sum(row[j] < row[i] or (row[j] == row[i] and j > i) for j in range(n)) for i in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ranks_follow_the_scores_and_rank_tied_entries_the_lower_index_higher(dtype):
    # rounded to a few levels, most entries tie; each rank is a distinct integer decided by score, then position
    scores = (torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0)) * 2).round().to(dtype)
    expected = torch.tensor([_ranks_by_the_rule(row) for row in scores.float().reshape(-1, 50).tolist()])
    assert torch.equal(rank01(scores).reshape(-1, 50), expected.float() / 49)
    assert torch.equal(quantile_rank(scores).reshape(-1, 50), (expected + 1).float() / 50)


@pytest.mark.parametrize("n", [7, 300])
def test_top_indices_takes_every_tied_entry_lowest_index_first(n):
    # torch.topk on the CPU takes 198, 200, 199, 201, 197 of 300 zeros, a CUDA kernel others
    assert torch.equal(top_indices(torch.zeros(3, n), 5), torch.arange(5).expand(3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_top_indices_are_the_largest_first_then_tied_ones_by_position(dtype):
    scores = (torch.randn(6, 64, generator=torch.Generator().manual_seed(1)) * 1.5).round().to(dtype)
    got = top_indices(scores, 20)
    for row, picked in zip(scores.float().tolist(), got.tolist(), strict=True):
        expected = sorted(range(64), key=lambda i: (-row[i], i))[:20]
        assert picked == expected
    # the same entries as a top-k of the ranks, so scores and their ranks select alike
    assert torch.equal(top_indices(rank01(scores), 20), got)


def test_top_indices_refuses_more_entries_than_a_row_has():
    # a sort would silently return all 5; topk raised, and so does this, naming the bound
    with pytest.raises(ValueError, match=r"k must lie in \[0, 5\].*got 7"):
        top_indices(torch.rand(2, 5), 7)
    assert top_indices(torch.rand(2, 5), 0).shape == (2, 0)
