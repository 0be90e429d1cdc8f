import pytest
import torch

from quickmerge.baselines import bipartite_round, tome_merge

from ..conftest import naive_group_means


@pytest.mark.parametrize("n,k", [(10, 3), (1024, 256), (7, 7), (5, 1), (33, 16)])
def test_tome_merge_reaches_k_with_size_weighted_means(n, k):
    x = torch.randn(2, n, 6, dtype=torch.float64)
    merged, assignment, sizes = tome_merge(x, k)
    assert merged.shape == (2, k, 6)
    assert torch.equal(sizes.sum(-1), torch.full((2,), n)) and sizes.min() >= 1
    expected = naive_group_means(x, torch.ones(2, n), assignment, k)
    assert torch.allclose(merged, expected, atol=1e-9)


def test_round_merges_most_similar_pairs_and_protects_first():
    x = torch.tensor([[[1.0, 0], [1.0, 0.01], [0, 1.0], [-1.0, 0.2]]])
    idx = bipartite_round(x, 1)
    assert idx[0, 0] == idx[0, 1]  # the near-duplicate pair merged
    idx = bipartite_round(x, 1, protect_first=True)
    assert idx[0, 0] != idx[0, 1]
    with pytest.raises(ValueError, match="r must be at most"):
        bipartite_round(x, 3)
