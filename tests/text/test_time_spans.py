"""QuickMergePress with ``time_period``: merged groups run along time, one location each."""

import pytest
import torch

from quickmerge.text import QuickMergePress


def test_time_spans_group_one_location_across_consecutive_frames():
    frames, per_frame, d = 6, 4, 8
    gen = torch.Generator().manual_seed(0)
    location_keys = torch.randn(per_frame, d, generator=gen)
    keys = location_keys.repeat(frames, 1) + 0.01 * torch.randn(frames * per_frame, d, generator=gen)
    keys = torch.cat([torch.randn(1, d, generator=gen), keys])[None, None]  # [1, 1, 1 + 24, d]: a BOS first
    values = torch.randn_like(keys)
    scores = torch.rand(1, 1, keys.shape[2], generator=gen)
    press = QuickMergePress(compression_ratio=0.5, mode="spans", time_period=per_frame, time_offset=1)
    kept = 12
    from quickmerge.merging import spans_along_time

    assignment = spans_along_time(keys[0], scores[0], kept, per_frame, 1)[0]
    location = torch.cat([torch.tensor([-1]), torch.arange(frames * per_frame) % per_frame])
    for g in range(kept):  # every group holds one location only, in consecutive frames
        members = (assignment == g).nonzero()[:, 0]
        assert location[members].unique().numel() == 1
        if members.numel() > 1 and members[0] > 0:
            assert torch.equal(members.diff(), torch.full_like(members.diff(), per_frame))
    out = press.merge(None, keys, values, scores, kept)
    assert out.keys.shape == (1, 1, kept, d)
    sizes = out.sizes[0, 0]
    assert sizes.sum() == keys.shape[2] and sorted(sizes.tolist()) == sorted(
        torch.bincount(assignment, minlength=kept).float().tolist())


def test_time_period_needs_spans():
    with pytest.raises(ValueError, match="mode='spans'"):
        QuickMergePress(compression_ratio=0.5, time_period=4)
    with pytest.raises(ValueError, match="time_period"):
        QuickMergePress(compression_ratio=0.5, mode="spans", time_period=0)
