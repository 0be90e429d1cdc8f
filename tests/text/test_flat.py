import pytest
import torch

from quickmerge.text.flat import select_and_merge

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_tied_scores_keep_the_lowest_entries_of_the_row_on_every_device():
    """Each head's sink scores highest, the rest tie: the seeds beyond the sinks are the row's first entries in
    head-major order (head 0's), not the ones topk's kernel happens to pick."""
    b, hkv, length, d, total = 2, 3, 40, 8, 20
    keys, values = torch.randn(b, hkv, length, d), torch.randn(b, hkv, length, d)
    scores = torch.zeros(b, hkv, length)
    scores[..., 0] = 1.0
    out = select_and_merge(keys, values, scores, torch.ones(b, hkv, length), total, epsilon=1e-6)
    # head 0 owns its sink and entries 1..17, heads 1 and 2 their sinks only
    assert torch.equal(out.owners, torch.tensor([0] * 18 + [1, 2]).expand(b, total))
    assert torch.allclose(out.keys[:, :18], keys[:, 0, :18], atol=1e-4)
