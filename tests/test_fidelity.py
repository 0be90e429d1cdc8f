import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quickmerge import NormBasedFidelityConstraint

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_identity_retains_everything():
    x = torch.randn(2, 6, 4)
    fid = NormBasedFidelityConstraint(gamma=0.9)
    assert torch.allclose(fid.retention(x, x), torch.ones(2))
    assert float(fid.compute_fidelity_loss(x, x)) == 0.0


def test_cancelling_merge_loses_mass_and_is_penalised():
    x = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    merged = x.mean(1, keepdim=True)  # the two tokens cancel
    fid = NormBasedFidelityConstraint(gamma=0.8)
    assert float(fid.retention(x, merged, torch.tensor([[2]]))) == pytest.approx(0.0)
    assert float(fid.compute_fidelity_loss(x, merged)) == pytest.approx(0.8)


def test_loss_has_gradient():
    x = torch.randn(2, 8, 4)
    merged = torch.randn(2, 2, 4).mul(0.01).requires_grad_()
    loss = NormBasedFidelityConstraint(0.8).compute_fidelity_loss(x, merged)
    loss.backward()
    assert loss > 0 and merged.grad.abs().sum() > 0


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 4), n=st.integers(1, 30), k=st.integers(1, 30), d=st.integers(1, 8))
def test_no_shape_errors_for_any_b_n_k(b, n, k, d):
    fid = NormBasedFidelityConstraint(0.8)
    loss = fid.compute_fidelity_loss(torch.randn(b, n, d), torch.randn(b, k, d))
    assert loss.shape == () and torch.isfinite(loss)


def test_bad_sizes_and_batch():
    fid = NormBasedFidelityConstraint(0.8)
    with pytest.raises(ValueError, match="sizes"):
        fid.retention(torch.randn(1, 4, 2), torch.randn(1, 2, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match="batch size"):
        fid.retention(torch.randn(2, 4, 2), torch.randn(1, 2, 2))
