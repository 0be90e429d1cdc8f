import pytest
import torch

from quickmerge import adaptive_tokens, tokens_for_budget

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_fixed_budget():
    assert tokens_for_budget(100, 0.2) == 20
    assert tokens_for_budget(3, 0.01) == 1
    assert tokens_for_budget(7, 1.0) == 7


def test_adaptive_budget_shrinks_for_concentrated_saliency():
    flat = torch.ones(1, 100)
    peaked = torch.zeros(1, 100)
    peaked[0, :5] = 1.0
    assert int(adaptive_tokens(flat, 0.2)) == 20
    assert int(adaptive_tokens(peaked, 0.2)) == 1
    with pytest.raises(ValueError, match="entropy_budget"):
        adaptive_tokens(flat, 0.0)


def test_allocate_sums_to_total_within_bounds_and_follows_weights():
    from quickmerge.budget import allocate

    out = allocate(100, [1.0, 3.0, 0.0, 6.0], [50, 50, 50, 50], [5, 5, 5, 5])
    assert sum(out) == 100 and all(5 <= o <= 50 for o in out)
    assert out[2] == 5 and out[3] > out[1] > out[0]  # weightless keeps its floor; more weight, more share
    capped = allocate(100, [1.0, 100.0], [60, 60], [0, 0])  # the heavy part is capped, its excess moves on
    assert capped == [40, 60]
    assert allocate(7, [1.0, 1.0, 1.0], [10, 10, 10], [0, 0, 0]) in ([3, 2, 2], [2, 3, 2], [2, 2, 3])
    with pytest.raises(ValueError, match="total"):
        allocate(200, [1.0], [100], [0])
