"""QuickMergePress with ``time_period``: merged groups run along time, one location each."""

import pytest
import torch

from quickmerge.text import QuickMergePress
from quickmerge.text.cache import cache_kwargs


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


def test_key_novelty_finds_the_entry_stated_once_and_novelty_seeds_keep_it():
    from quickmerge.text.scoring import key_novelty

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 8, generator=gen)
    keys = base.repeat(6, 1) + 0.01 * torch.randn(24, 8, generator=gen)  # every key has near copies...
    keys[13] = torch.randn(8, generator=gen) * 3  # ...but one
    keys = keys[None, None]
    novelty = key_novelty(keys, chunk=5)
    assert novelty.shape == (1, 1, 24) and int(novelty[0, 0].argmax()) == 13
    assert novelty[0, 0, torch.arange(24) != 13].max() < 0.01
    values = torch.randn_like(keys)
    scores = torch.linspace(1.0, 0.05, 24)[None, None].clone()
    scores[0, 0, 13] = 0.0  # the least salient entry by attention
    plain = QuickMergePress(compression_ratio=0.5)
    novel = QuickMergePress(compression_ratio=0.5, novelty=2.0)

    def kept_alone(press, s):
        out = press.merge(None, keys, values, s, 12)
        return bool(((out.keys[0, 0] - keys[0, 0, 13]).norm(dim=-1) < 1e-4).any())

    from quickmerge.primitives import rank01

    assert not kept_alone(plain, scores)
    assert kept_alone(novel, scores + 2.0 * rank01(novelty[0])[None])  # what score() adds
    with pytest.raises(ValueError, match="novelty"):
        QuickMergePress(compression_ratio=0.5, novelty=-1.0)


def test_novelty_scores_run_end_to_end_on_a_model():
    transformers = pytest.importorskip("transformers")
    from tests.text.tiny import tiny

    model = tiny("llama", "sdpa", layers=2)
    ids = torch.randint(0, 97, (1, 40))
    cache = transformers.DynamicCache()
    press = QuickMergePress(compression_ratio=0.5, novelty=1.0)
    with torch.no_grad(), press(model):
        model.model(ids, **cache_kwargs(model, cache))
        logits = model(torch.randint(0, 97, (1, 3)), **cache_kwargs(model, cache)).logits
    assert [layer.keys.shape[2] for layer in cache.layers] == [23, 23] and torch.isfinite(logits).all()
