"""``benchmarks/vision_offshelf_paired.py``: a method's per-image hits interpolated at a reference's speed-up."""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


@pytest.fixture
def paired_at(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # its sibling imports
    from benchmarks.vision_offshelf_paired import paired_at

    return paired_at


def test_the_interpolated_hits_minus_the_reference_hits_with_an_interval(paired_at):
    ours = [(2.0, torch.tensor([True, False, True, False])), (1.0, torch.tensor([True, True, False, False]))]
    reference = torch.tensor([True, True, True, False])
    out = paired_at(ours, 1.5, reference, samples=500)  # halfway: scores 1, .5, .5, 0 against 1, 1, 1, 0
    assert out["difference"] == pytest.approx(-0.25)
    assert out["between_speedups"] == [1.0, 2.0] and out["weight"] == pytest.approx(0.5)
    assert -0.5 <= out["low"] <= out["difference"] <= out["high"] <= 0.0
    slow, fast = torch.tensor([True, True, True, False]), torch.zeros(4, dtype=torch.bool)
    quarter = paired_at([(1.0, slow), (2.0, fast)], 1.25, torch.ones(4, dtype=torch.bool), samples=500)
    assert quarter["weight"] == pytest.approx(0.25)  # 3/4 of the slower setting's hits: .75, .75, .75, 0
    assert quarter["difference"] == pytest.approx((3 * (0.75 - 1) + (0 - 1)) / 4)
    assert paired_at(ours, 2.5, reference, samples=500) is None  # beyond the method's fastest setting
    assert paired_at(ours, 0.9, reference, samples=500) is None
    alone = paired_at(ours[:1], 2.0, reference, samples=500)  # one setting exactly at the speed-up
    assert alone["difference"] == pytest.approx(-0.25)
