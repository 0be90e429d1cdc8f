"""Per-image budgets: the content router, calibration at a constant schedule's cost, bucketed execution."""

import pytest
import torch

from quickmerge.vision import patch
from quickmerge.vision.budget import constant_schedule, entropy_schedule, schedule_cost, token_counts
from quickmerge.vision.image_budget import ImageBudget, bucketed_forward, content_perplexity

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_content_perplexity_counts_the_patches_that_hold_content():
    images = torch.zeros(4, 1, 8, 8)
    images[1, 0, :2, :2] = 1.0  # one 2x2 patch of 16
    images[2, 0, :2, :] = 1.0  # four patches
    images[3] = torch.rand(1, 8, 8)  # texture everywhere
    score = content_perplexity(images, 2)
    assert score[0] == pytest.approx(1.0) and score[1] == pytest.approx(1.0) and score[2] == pytest.approx(4.0)
    assert score[3] > 8
    assert torch.allclose(content_perplexity(3 * images - 0.5, 2), score, rtol=1e-4)  # normalisation-invariant
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        content_perplexity(images[0], 2)


def _calibration(n=64):
    g = torch.Generator().manual_seed(0)
    images = torch.zeros(n, 1, 16, 16)
    for i in range(n):  # objects of growing size on a plain background
        side = 2 + (i * 14) // n
        images[i, 0, :side, :side] = torch.rand(side, side, generator=g) + 0.5
    return images


def test_simple_images_merge_more_at_the_constant_schedules_cost():
    images = _calibration()
    budget = ImageBudget.calibrate(images, patch_size=2, num_tokens=64, num_layers=3, r=8, buckets=4)
    assert budget.r == sorted(budget.r, reverse=True) and budget.r[0] > 8 > budget.r[-1] - 1
    bucket = budget.assign(images)
    share = torch.bincount(bucket, minlength=4).float() / len(images)
    cost = sum(float(s) * schedule_cost(token_counts(64, [x] * 3)) for s, x in zip(share, budget.r, strict=True))
    assert cost <= schedule_cost(token_counts(64, [8] * 3))
    # harder budgets, where the simplest bucket asks for every token long before the hardest merges its share
    # (this used to fall back to constant r: the search stopped at a scale of num_tokens)
    hard = ImageBudget.calibrate(images, patch_size=2, num_tokens=64, num_layers=3, r=16, buckets=4)
    assert hard.r[0] == 64 and hard.r == sorted(hard.r, reverse=True) and hard.r[-1] < 16
    same = ImageBudget.calibrate(torch.ones(8, 1, 16, 16) * images[:1], patch_size=2, num_tokens=64, num_layers=3,
                                 r=8, buckets=2)
    assert same.r == [8, 8]  # nothing to tell the images apart: the constant schedule
    with pytest.raises(ValueError, match="one r per bucket"):
        ImageBudget([1.0], [4], 2)


def test_bucketed_forward_is_each_image_run_at_its_buckets_r():
    from tests.vision.adapters.test_timm_vit import tiny_vit

    model = tiny_vit(fused=True)
    images = _calibration(12)
    budget = ImageBudget.calibrate(images, patch_size=2, num_tokens=64, num_layers=3, r=8, buckets=3)
    with torch.no_grad(), patch(model, r=5) as handle:
        out, mean_tokens = bucketed_forward(model, handle, images, budget)
        assert handle.r == 5
        bucket = budget.assign(images)
        expected, tokens = [], []
        for i in range(len(images)):
            handle.r = budget.r[int(bucket[i])]
            expected.append(model(images[i : i + 1]))
            tokens.append(handle.mean_tokens)
    assert torch.allclose(out, torch.cat(expected), atol=1e-5)
    assert mean_tokens == pytest.approx(sum(tokens) / len(tokens))
    assert len(set(budget.r)) > 1


def test_greedy_budgets_pass_the_cap_and_cost_what_the_constant_schedule_down_to_the_floor_costs():
    images = _calibration()
    budget = ImageBudget.calibrate(images, patch_size=2, num_tokens=64, num_layers=3, r=24, buckets=4,
                                   bipartite=False)
    assert budget.schedules is not None and budget.schedules[0][0] > 32  # the simplest bucket merges past half
    assert budget.schedules == [constant_schedule(64, x, 3, bipartite=False) for x in budget.r]  # as eval vision's
    share = torch.bincount(budget.assign(images), minlength=4).float() / len(images)
    for schedule in budget.schedules:
        counts = token_counts(64, [float(x) for x in schedule], bipartite=False)
        assert min(counts) >= 8 and sum(schedule) == 64 - counts[-1]  # every merge asked for happens
    cost = sum(float(s) * schedule_cost(token_counts(64, [float(x) for x in sched], bipartite=False))
               for s, sched in zip(share, budget.schedules, strict=True))
    assert cost <= schedule_cost(token_counts(64, [24.0] * 3, bipartite=False))
    assert ImageBudget(**budget.to_dict()) == budget
    perplexity = [30.0, 5.0, 12.0]
    shaped = ImageBudget.calibrate(images, patch_size=2, num_tokens=64, num_layers=3, r=24, buckets=4,
                                   bipartite=False, perplexity=perplexity)
    assert shaped.schedules == [entropy_schedule(perplexity, 64, x, bipartite=False) for x in shaped.r]
    with pytest.raises(ValueError, match="one value per block"):
        ImageBudget.calibrate(images, patch_size=2, num_tokens=64, num_layers=3, r=24, perplexity=[1.0, 2.0])
    with pytest.raises(ValueError, match="one schedule per bucket"):
        ImageBudget([1.0], [4, 4], 2, [[4, 4, 4]])


def test_bucketed_forward_runs_each_buckets_schedule():
    from tests.vision.adapters.test_timm_vit import tiny_vit

    model = tiny_vit(fused=False)
    images = _calibration(12)
    budget = ImageBudget.calibrate(images, patch_size=2, num_tokens=64, num_layers=3, r=24, buckets=3,
                                   bipartite=False)
    bucket = budget.assign(images)
    with torch.no_grad(), patch(model, matching="greedy") as handle:
        _, mean_tokens = bucketed_forward(model, handle, images, budget)
    expected = [token_counts(64, [float(x) for x in budget.schedules[int(k)]], bipartite=False)[:-1] for k in bucket]
    assert mean_tokens == pytest.approx(sum(1 + sum(c) / 3 for c in expected) / len(images))  # + the class token
