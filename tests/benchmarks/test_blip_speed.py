"""The BLIP speed benchmark feeds real photos, cycled to the batch and normalised as BLIP's processor does."""

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from benchmarks import blip_speed

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_the_photos_cycle_to_the_batch_and_are_normalised_by_clips_statistics():
    x = blip_speed.photos(6, 32)
    assert x.shape == (6, 3, 32, 32) and torch.equal(x[4], x[0]) and not torch.equal(x[1], x[0])
    raw = x * blip_speed.STD[:, None, None] + blip_speed.MEAN[:, None, None]  # back to [0, 1] pixels
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6 and raw.std() > 0.1
