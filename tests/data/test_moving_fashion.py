"""Moving Fashion-MNIST: the items move at the given speed, bounce inside the canvas, combine by maximum."""

import pytest
import torch

from quickmerge.data.moving_fashion import moving_fashion_mnist

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def _items(n: int = 4) -> torch.Tensor:
    items = torch.zeros(n, 28, 28, dtype=torch.uint8)
    items[:, 10:18, 10:18] = torch.arange(1, n + 1, dtype=torch.uint8)[:, None, None] * 50  # a bright square
    return items


def _square_corner(frame: torch.Tensor) -> torch.Tensor:
    ys, xs = torch.nonzero(frame, as_tuple=True)
    return torch.stack([ys.min(), xs.min()]).float()


def test_one_item_moves_at_the_speed_and_stays_on_the_canvas():
    video = moving_fashion_mnist(_items(1), 3, frames=40, canvas=64, per_sequence=1, speed=3.0, seed=5)
    assert video.shape == (3, 40, 64, 64) and video.dtype == torch.uint8
    for seq in video:
        corners = torch.stack([_square_corner(f) for f in seq])
        assert (corners >= 10).all() and (corners <= 36 + 10).all()  # item inside the 64x64 canvas
        steps = (corners[1:] - corners[:-1]).norm(dim=-1)
        # Straight moves are 3 px (rounding adds at most ~1.5); a bounce shortens a step, never lengthens it.
        assert steps.max() <= 3.0 + 1.5
        assert (steps > 1.5).float().mean() > 0.8  # it keeps moving


def test_overlapping_items_combine_by_maximum_and_sequences_are_reproducible():
    items = _items(2)
    a = moving_fashion_mnist(items, 8, frames=5, per_sequence=2, seed=1)
    assert torch.equal(a, moving_fashion_mnist(items, 8, frames=5, per_sequence=2, seed=1))
    assert not torch.equal(a, moving_fashion_mnist(items, 8, frames=5, per_sequence=2, seed=2))
    assert set(a.unique().tolist()) <= {0, 50, 100}  # max-combination never sums brightness
    still = moving_fashion_mnist(items[:1], 1, frames=3, per_sequence=2, speed=0.0, seed=0)
    assert torch.equal(still[0, 0], still[0, 2])  # speed 0: nothing moves


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="items"):
        moving_fashion_mnist(torch.zeros(2, 28, 28), 1)
    with pytest.raises(ValueError, match="canvas"):
        moving_fashion_mnist(_items(), 1, canvas=20)
    with pytest.raises(ValueError, match="count"):
        moving_fashion_mnist(_items(), 0)


def test_return_items_names_the_item_each_sequence_shows():
    items = _items(5)
    video, which = moving_fashion_mnist(items, 6, frames=2, canvas=28, per_sequence=1, seed=3, return_items=True)
    assert which.shape == (6, 1) and which.dtype == torch.long
    assert torch.equal(video, items[which[:, 0]][:, None].expand(-1, 2, -1, -1))  # no room to move: the item itself
    assert torch.equal(video, moving_fashion_mnist(items, 6, frames=2, canvas=28, per_sequence=1, seed=3))
