import pytest
import torch

from quickmerge import adaptive_tokens, tokens_for_budget


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
