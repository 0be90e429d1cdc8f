import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def naive_group_means(x: torch.Tensor, mass: torch.Tensor, assignment: torch.Tensor, k: int) -> torch.Tensor:
    """Reference weighted means with explicit loops (tests only)."""
    b, _, d = x.shape
    out = torch.zeros(b, k, d, dtype=torch.float64)
    for i in range(b):
        for g in range(k):
            members = assignment[i] == g
            w = mass[i][members].double()
            out[i, g] = (w[:, None] * x[i][members].double()).sum(0) / w.sum()
    return out
