import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quickmerge import DifferentiableTokenMerging
from quickmerge.merging import contiguous_spans, merge_mass

from .conftest import naive_group_means

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def _check_structure(result, b, n, k):
    assert result.merged.shape[:2] == (b, k)
    assert result.assignment.shape == (b, n)
    assert int(result.assignment.min()) >= 0 and int(result.assignment.max()) < k
    assert torch.equal(result.sizes.sum(-1), torch.full((b,), n))
    assert int(result.sizes.min()) >= 1  # exactly K non-empty groups
    assert (result.first <= result.last).all()
    assert (result.positions >= result.first).all() and (result.positions <= result.last + 1e-4).all()


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    n=st.integers(1, 40),
    d=st.integers(1, 12),
    frac=st.floats(0.0, 1.0),
    causal=st.booleans(),
    training=st.booleans(),
)
def test_shapes_groups_and_convexity(b, n, d, frac, causal, training):
    k = max(1, min(n, round(frac * n)))
    x = torch.randn(b, n, d, dtype=torch.float64)
    s = torch.rand(b, n)
    merger = DifferentiableTokenMerging(causal=causal).train(training)
    result = merger(x, s, k)
    merged, mask = result
    _check_structure(result, b, n, k)
    assert mask.shape == (b, n)
    if k < n:
        mass = merge_mass(result.mask, s, merger.epsilon)
        expected = naive_group_means(x, mass, result.assignment, k)
        assert torch.allclose(merged.detach().double(), expected, atol=1e-6)
    if causal:
        steps = result.assignment.diff(dim=1)
        assert ((steps == 0) | (steps == 1)).all()
        assert (result.assignment[:, 0] == 0).all() and (result.assignment[:, -1] == k - 1).all()
    elif k < n:
        assert torch.equal(result.assignment.gather(1, result.seeds), torch.arange(k).expand(b, k))


def test_k_equals_n_returns_input_unchanged():
    x = torch.randn(2, 9, 4)
    merged, mask = DifferentiableTokenMerging()(x, torch.rand(2, 9), 9)
    assert merged is x and torch.equal(mask, torch.ones(2, 9))


@pytest.mark.parametrize("causal", [False, True])
def test_eval_mode_is_deterministic(causal):
    x, s = torch.randn(2, 64, 16), torch.rand(2, 64)
    merger = DifferentiableTokenMerging(causal=causal).eval()
    a, b = merger(x, s, 10), merger(x, s, 10)
    assert torch.equal(a.merged, b.merged) and torch.equal(a.assignment, b.assignment)


def test_gradients_reach_tokens_and_saliency_in_training():
    x = torch.randn(2, 30, 8, requires_grad=True)
    s = torch.rand(2, 30, requires_grad=True)
    merged, _ = DifferentiableTokenMerging().train()(x, s, 6)
    (merged * torch.randn_like(merged)).sum().backward()
    assert x.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


def test_similar_tokens_are_grouped_together():
    # Three well-separated directions, ten noisy copies each, one salient token in each:
    # K=3 must recover them.
    base = torch.eye(3, 16) * 10
    x = (base.repeat_interleave(10, 0) + 0.1 * torch.randn(30, 16))[torch.randperm(30)][None]
    labels = x[0].abs().argmax(-1)
    s = torch.rand(1, 30) * 0.5
    s[0, [int((labels == c).nonzero()[0]) for c in range(3)]] = 1.0
    result = DifferentiableTokenMerging().eval()(x, s, 3)
    for g in range(3):
        assert labels[result.assignment[0] == g].unique().numel() == 1


def test_causal_spans_cut_at_weakest_links():
    # Tokens change direction twice: with no saliency the two cuts fall exactly there.
    x = torch.cat(
        [
            torch.tensor([1.0, 0, 0]).expand(4, 3),
            torch.tensor([0, 1.0, 0]).expand(3, 3),
            torch.tensor([0, 0, 1.0]).expand(5, 3),
        ]
    )[None]
    assignment = contiguous_spans(x, torch.zeros(1, 12), 3, saliency_weight=0.0)
    assert assignment[0].tolist() == [0] * 4 + [1] * 3 + [2] * 5


def test_causal_salient_token_stays_alone():
    x = torch.ones(1, 10, 4)  # all links equally strong
    s = torch.zeros(1, 10)
    s[0, 5] = 1.0
    assignment = contiguous_spans(x, s, 3, saliency_weight=1.0)
    assert (assignment[0] == assignment[0, 5]).sum() == 1


@pytest.mark.parametrize("n, k", [(12, 3), (300, 100)])
def test_causal_spans_cut_tied_links_lowest_position_first(n, k):
    # Every link ties (identical tokens): the k - 1 cuts are links 0..k-2, the same on every device.
    # (torch.topk on the CPU cut links 7-8 of 11 and 151-249 of 299 here.)
    assignment = contiguous_spans(torch.ones(2, n, 4), torch.zeros(2, n), k, saliency_weight=0.0)
    expected = torch.cat([torch.arange(k - 1), torch.full((n - k + 1,), k - 1)])
    assert torch.equal(assignment, expected.expand(2, n))


def test_causal_spans_cut_tied_links_in_the_order_given():
    x, s = torch.ones(1, 10, 4), torch.zeros(1, 10)
    latest_first = contiguous_spans(x, s, 4, saliency_weight=0.0, tie_rank=-torch.arange(9))
    assert latest_first[0].tolist() == [0] * 7 + [1, 2, 3]
    x[0, 3] = -1.0  # an untied weakest pair of links goes first whatever the rank: links 2 and 3
    assert contiguous_spans(x, s, 4, saliency_weight=0.0, tie_rank=-torch.arange(9))[0].tolist() == (
        [0] * 3 + [1] + [2] * 5 + [3])


def test_causal_spans_tie_order_ignores_the_other_rows_and_the_dtype():
    # Ties among part of the links only, in a batch whose rows differ: each row as if alone, in every dtype.
    x = torch.randn(3, 64, 8)
    x[:, 10:40] = x[:, 10:11]  # a run of identical tokens: 29 tied links, the strongest of each row
    s = torch.zeros(3, 64)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        together = contiguous_spans(x.to(dtype), s, 40, saliency_weight=0.0)
        for b in range(3):
            alone = contiguous_spans(x[b : b + 1].to(dtype), s[b : b + 1], 40, saliency_weight=0.0)
            assert torch.equal(together[b : b + 1], alone)
            run = together[b, 10:40] - together[b, 10]
            cut = int(run[-1])  # how many of the tied links were cut: always the run's first ones
            assert 0 < cut < 29
            assert torch.equal(run, torch.cat([torch.arange(cut + 1), torch.full((29 - cut,), cut)]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision(dtype, causal):
    x, s = torch.randn(2, 50, 32), torch.rand(2, 50)
    merger = DifferentiableTokenMerging(causal=causal).eval()
    ref = merger(x, s, 12)
    out = merger(x.to(dtype), s, 12)
    assert out.merged.dtype == dtype
    same = (out.assignment == ref.assignment).all(-1)
    assert same.any()  # rounding may flip a near-tie, but not everything
    i = int(same.nonzero()[0])
    assert torch.allclose(out.merged[i].float(), ref.merged[i], atol=0.05, rtol=0.05)


def test_unmerge_broadcasts_group_values_back():
    x, s = torch.randn(1, 20, 5), torch.rand(1, 20)
    result = DifferentiableTokenMerging().eval()(x, s, 4)
    back = result.unmerge()
    assert back.shape == (1, 20, 5)
    for i in range(20):
        assert torch.equal(back[0, i], result.merged[0, result.assignment[0, i]])
    assert result.ratio == pytest.approx(4 / 20) and result.num_tokens == 4


def test_time_major_order_lists_each_location_through_time():
    from quickmerge.merging import time_major_order

    order = time_major_order(1 + 3 * 4, period=4, offset=1)  # a BOS, then 3 frames of 4 tokens
    assert order.tolist() == [0, 1, 5, 9, 2, 6, 10, 3, 7, 11, 4, 8, 12]
    assert torch.equal(time_major_order(6, period=6), torch.arange(6))  # one frame: unchanged
    with pytest.raises(ValueError, match="period"):
        time_major_order(6, period=0)


def test_spans_along_time_break_between_locations_first():
    from quickmerge.merging import frame_location, spans_along_time

    x, s = torch.randn(2, 1 + 3 * 6, 4), torch.rand(2, 19)
    location = frame_location(19, 6, 1)
    groups = spans_along_time(x, s, 7, period=6, offset=1)  # 7 = BOS + 6 locations: exactly one group each
    for b in range(2):
        assert all(location[groups[b] == g].unique().numel() == 1 for g in range(7))
        assert groups[b].unique().numel() == 7
    few = spans_along_time(x, s, 4, period=6, offset=1)  # fewer groups than locations: neighbours join
    assert all(few[b].unique().numel() == 4 for b in range(2))
    for b in range(2):  # a group never splits one location's run through time
        for loc in range(6):
            assert few[b][location == loc].unique().numel() == 1
