"""Every kind of bad input raises a clear error naming the argument, before heavy work."""

import contextlib

import pytest
import torch

from quickmerge import (
    BidirectionalARAlignment,
    DifferentiableTokenMerging,
    EntropyAwareSaliency,
    NormBasedFidelityConstraint,
    QuickMergePP,
    quickmerge_inference,
)

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

QM = QuickMergePP(8, num_layers=2)
X = torch.randn(2, 10, 8)


@pytest.mark.parametrize(
    "x,k,error,match",
    [
        (torch.randn(10, 8), 2, ValueError, r"X must have shape \[B, N, D\]"),
        (torch.randn(1, 2, 10, 8), 2, ValueError, r"X must have shape \[B, N, D\]"),
        (torch.randn(2, 10, 7), 2, ValueError, "D=8"),
        (torch.randn(2, 0, 8), 1, ValueError, "at least one token"),
        (torch.randn(0, 10, 8), 1, ValueError, "non-empty batch"),
        (torch.ones(2, 10, 8, dtype=torch.long), 2, TypeError, "floating-point"),
        (torch.full((2, 10, 8), float("nan")), 2, ValueError, "NaN or infinite"),
        (torch.full((2, 10, 8), float("inf")), 2, ValueError, "NaN or infinite"),
        ([[1.0]], 2, TypeError, "torch.Tensor"),
        (X, 0, ValueError, "1 <= K <= N=10"),
        (X, 11, ValueError, "1 <= K <= N=10"),
        (X, -3, ValueError, "K"),
        (X, 2.0, TypeError, "K must be an integer"),
        (X, 2.5, TypeError, "K must be an integer"),
        (X, True, TypeError, "K must be an integer"),
        (X, "2", TypeError, "K must be an integer"),
        (X, torch.tensor(2.0), TypeError, "K must be an integer"),
    ],
)
def test_quickmergepp_bad_input(x, k, error, match):
    with pytest.raises(error, match=match):
        QM(x, k)


def test_integer_tensor_k_is_accepted():
    assert QM(X, torch.tensor(3))[0].shape == (2, 3, 8)


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: QuickMergePP(8, temperature=0), "temperature"),
        (lambda: QuickMergePP(8, temperature=-1.0), "temperature"),
        (lambda: QuickMergePP(8, temperature=float("nan")), "temperature"),
        (lambda: QuickMergePP(8, epsilon=0), "epsilon"),
        (lambda: QuickMergePP(8, epsilon=1.5), "epsilon"),
        (lambda: QuickMergePP(8, gamma=-0.1), "gamma"),
        (lambda: QuickMergePP(8, gamma=1.1), "gamma"),
        (lambda: QuickMergePP(8, alpha=-1), "alpha"),
        (lambda: QuickMergePP(8, num_layers=0), "num_layers"),
        (lambda: QuickMergePP(0), "embedding_dim"),
        (lambda: EntropyAwareSaliency(8, num_layers=0), "num_layers"),
        (lambda: EntropyAwareSaliency(8, salient="medium"), "salient"),
        (lambda: DifferentiableTokenMerging(temperature=0.0), "temperature"),
        (lambda: DifferentiableTokenMerging(epsilon=-0.01), "epsilon"),
        (lambda: NormBasedFidelityConstraint(gamma=2), "gamma"),
        (lambda: BidirectionalARAlignment(8, hidden_dim=10, num_heads=4), "divisible"),
    ],
)
def test_bad_hyperparameters(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


@pytest.mark.parametrize(
    "factory",
    [lambda: QuickMergePP(8.5), lambda: QuickMergePP(8, num_layers=2.0), lambda: QuickMergePP(8, temperature="0.1")],
)
def test_wrong_types_of_hyperparameters(factory):
    with pytest.raises(TypeError):
        factory()


@pytest.mark.parametrize(
    "saliency,error,match",
    [
        (torch.rand(2, 9), ValueError, r"saliency_scores must have shape \[B, N\] = \[2, 10\]"),
        (torch.rand(10), ValueError, "saliency_scores must have shape"),
        (torch.ones(2, 10, dtype=torch.long), TypeError, "saliency_scores must be a floating"),
        (torch.full((2, 10), float("nan")), ValueError, "saliency_scores contains NaN"),
        (-torch.rand(2, 10), ValueError, "non-negative"),
        (None, TypeError, "saliency_scores must be a torch.Tensor"),
    ],
)
def test_bad_saliency(saliency, error, match):
    with pytest.raises(error, match=match):
        DifferentiableTokenMerging()(X, saliency, 3)


def test_bad_saliency_in_pipeline():
    with pytest.raises(ValueError, match=r"saliency must have shape \[B, N\]"):
        QM(X, 3, saliency=torch.rand(2, 3))


@pytest.mark.parametrize(
    "x,budget,error,match",
    [
        (torch.randn(2, 10, 8), 0.2, ValueError, r"X_single must have shape \[N, D\]"),
        (torch.randn(0, 8), 0.2, ValueError, "at least one token"),
        (torch.randn(10, 8), 0.0, ValueError, "entropy_budget"),
        (torch.randn(10, 8), 1.2, ValueError, "entropy_budget"),
        (torch.randn(10, 8), float("nan"), ValueError, "entropy_budget"),
        (torch.randn(10, 8), "0.2", TypeError, "entropy_budget"),
    ],
)
def test_inference_bad_input(x, budget, error, match):
    with pytest.raises(error, match=match):
        quickmerge_inference(x, lambda t: t, entropy_budget=budget)


def test_errors_come_before_heavy_work(monkeypatch):
    calls = []
    monkeypatch.setattr(QM.saliency, "_multiscale_entropies", lambda x: calls.append(1))
    with pytest.raises(ValueError):
        QM(X, 11)
    assert calls == []


@contextlib.contextmanager
def host_reads():
    """Count reads of tensor values back to the host (each one a device sync on a GPU)."""
    count = {"n": 0}
    names = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(fn):
        def wrapper(*args, **kwargs):
            count["n"] += 1
            return fn(*args, **kwargs)

        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counting(fn))
    try:
        yield count
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _public_calls():
    from quickmerge import (
        BidirectionalARAlignment,
        DifferentiableTokenMerging,
        EntropyAwareSaliency,
        NormBasedFidelityConstraint,
        QuickMergePP,
    )

    x, s = torch.randn(2, 40, 16), torch.rand(2, 40)
    return {
        "DifferentiableTokenMerging": lambda: DifferentiableTokenMerging().eval()(x, s, 10),
        "DifferentiableTokenMerging causal, training": lambda: DifferentiableTokenMerging(causal=True)(x, s, 10),
        "QuickMergePP forward": lambda: QuickMergePP(16, num_layers=3).eval()(x, 10),
        "QuickMergePP forward with saliency": lambda: QuickMergePP(16).eval()(x, 10, saliency=s),
        "QuickMergePP compress": lambda: QuickMergePP(16).eval().compress(x, 10),
        "EntropyAwareSaliency": lambda: EntropyAwareSaliency(16, 3)(x),
        "NormBasedFidelityConstraint": lambda: NormBasedFidelityConstraint()(x, x[:, :10]),
        "BidirectionalARAlignment": lambda: BidirectionalARAlignment(16).compute_alignment_loss(x[:, :10]),
    }


@pytest.mark.parametrize("name", list(_public_calls()))
def test_argument_checks_cost_at_most_one_host_read_per_public_call(name):
    call = _public_calls()[name]
    with host_reads() as count:
        call()
    assert count["n"] <= 1, f"{name} read tensor values back {count['n']} times"


def test_host_read_counter_counts():
    with host_reads() as count:
        bool(torch.ones(()) > 0)
        torch.ones(2).tolist()
    assert count["n"] == 2
