import pytest
import torch

pytest.importorskip("sklearn")
from quickmerge.baselines.reference import reference_quickmerge

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_reference_runs_and_returns_k_tokens():
    out = reference_quickmerge(torch.randn(2, 30, 8), 5, num_layers=2)
    assert out.shape == (2, 5, 8) and torch.isfinite(out).all()
