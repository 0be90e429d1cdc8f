import pytest

from quickmerge.vision.schedule import inflected_schedule, r_for_ratio, validate_r

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_r_forms():
    assert validate_r(8, 3) == [8, 8, 8]
    assert validate_r([1, 2, 3], 3) == [1, 2, 3]
    sched = validate_r((16, -0.5), 6)
    assert sched[0] > sched[-1] and abs(sum(sched) / 6 - 16) <= 0.5
    assert inflected_schedule(4, 10, 0.0) == [10] * 4


@pytest.mark.parametrize("bad", [-1, [1, 2], [1, 2, -3], "8", 2.5, True, (16, 2.0)])
def test_bad_r_raises_naming_r(bad):
    with pytest.raises((TypeError, ValueError), match="r"):
        validate_r(bad, 3)


def test_ratio_leaves_the_requested_share():
    for ratio, n, layers in [(0.5, 196, 6), (0.1, 196, 6), (1.0, 196, 6), (0.25, 100, 4)]:
        sched = r_for_ratio(ratio, n, layers)
        assert len(sched) == layers and max(sched) - min(sched) <= 1
        assert n - sum(sched) == max(1, round(ratio * n))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "half", None])
def test_bad_ratio_raises(bad):
    with pytest.raises(ValueError, match="ratio"):
        r_for_ratio(bad, 196, 6)
