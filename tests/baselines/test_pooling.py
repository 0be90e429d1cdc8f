import pytest
import torch

from quickmerge.baselines import random_drop, uniform_pool

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_uniform_pool_equal_contiguous_spans():
    x = torch.arange(12.0).view(1, 12, 1)
    merged, assignment, sizes = uniform_pool(x, 4)
    assert merged.flatten().tolist() == [1.0, 4.0, 7.0, 10.0]
    assert sizes.tolist() == [[3, 3, 3, 3]] and (assignment.diff() >= 0).all()
    with pytest.raises(ValueError, match="k must satisfy"):
        uniform_pool(x, 13)


def test_random_drop_keeps_k_in_order():
    x = torch.arange(20.0).view(1, 20, 1).expand(3, 20, 1)
    kept, index = random_drop(x, 5, generator=torch.Generator().manual_seed(1))
    assert kept.shape == (3, 5, 1) and (index.diff() > 0).all()
    assert torch.equal(kept[..., 0], index.float())
