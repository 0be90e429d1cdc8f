"""Entropy budgets for ViTs: attention perplexity per block, schedules at a constant schedule's cost."""

import pytest
import torch

from quickmerge.vision import patch as quickmerge_patch
from quickmerge.vision.budget import block_attention_perplexity, constant_schedule, entropy_schedule

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def _cost(num_tokens, schedule):
    counts = [num_tokens]
    for r in schedule:
        counts.append(counts[-1] - min(r, counts[-1] // 2))  # as the handle caps a bipartite merge
    return sum(counts[i] + counts[i + 1] for i in range(len(schedule)))


def test_flat_perplexity_gives_about_the_constant_schedule_and_never_costs_more():
    for r in (4, 16, 32):
        schedule = entropy_schedule([50.0] * 6, 196, r)
        assert _cost(196, schedule) <= _cost(196, [r] * 6)
        assert _cost(196, schedule) >= _cost(196, [r] * 6) - 12  # rounding only
        assert all(x >= 0 for x in schedule)


def test_blocks_that_attend_narrowly_merge_more():
    narrow_late = entropy_schedule([120.0, 120.0, 120.0, 10.0, 10.0, 10.0], 196, 16)
    narrow_first = entropy_schedule([10.0, 120.0, 120.0, 120.0, 120.0, 120.0], 196, 16)
    assert min(narrow_late[3:]) > max(narrow_late[:3])
    assert narrow_first[0] == max(narrow_first) and narrow_first[0] > 16
    assert _cost(196, narrow_late) <= _cost(196, [16] * 6) and _cost(196, narrow_first) <= _cost(196, [16] * 6)
    for schedule in (narrow_late, narrow_first):
        counts = [196]
        for r in schedule:
            assert r <= counts[-1] // 2  # ToMe's bipartite cap
            counts.append(counts[-1] - r)
    with pytest.raises(ValueError, match="positive"):
        entropy_schedule([0.0, 1.0], 196, 8)


def test_greedy_schedules_pass_the_bipartite_cap_and_keep_the_floor():
    from quickmerge.vision.budget import schedule_cost, token_counts

    assert token_counts(196, [80] * 3) == [196, 116, 58, 29]  # at most half of each block's tokens
    assert token_counts(196, [80] * 3, bipartite=False) == [196, 116, 36, 8]  # down to the floor of 8
    narrow_late = [120.0, 120.0, 120.0, 10.0, 10.0, 10.0]
    greedy = entropy_schedule(narrow_late, 196, 60, bipartite=False)
    counts = token_counts(196, [float(r) for r in greedy], bipartite=False)
    assert [counts[i] - counts[i + 1] for i in range(6)] == greedy and min(counts) >= 8
    assert schedule_cost(counts) <= schedule_cost(token_counts(196, [60.0] * 6, bipartite=False))
    assert any(r > c // 2 for r, c in zip(greedy, counts, strict=False))  # past what bipartite matching allows


def test_a_greedy_entropy_schedule_runs_as_counted_on_a_patched_model():
    """The handle merges what a schedule past the bipartite cap asks, so the cost it was sized by is what runs."""
    from quickmerge.vision import patch
    from quickmerge.vision.budget import token_counts
    from tests.vision.adapters.test_timm_vit import tiny_vit

    model = tiny_vit(fused=True).eval()
    perplexity = block_attention_perplexity(model, torch.randn(4, 1, 16, 16))
    schedule = entropy_schedule(perplexity, 64, 20, floor=4, bipartite=False)
    counts = token_counts(64, [float(r) for r in schedule], 4, bipartite=False)
    assert any(r > c // 2 for r, c in zip(schedule, counts, strict=False))  # past the cap somewhere
    with patch(model, r=schedule, matching="greedy") as handle, torch.no_grad():
        model(torch.randn(2, 1, 16, 16))
    assert handle.tokens_per_layer == [c + 1 for c in counts[:-1]]  # + the class token


def test_block_perplexity_is_measured_on_the_model():
    from tests.vision.adapters.test_timm_vit import tiny_vit

    model = tiny_vit(fused=True).eval()
    values = block_attention_perplexity(model, torch.randn(5, 1, 16, 16), batch_size=2)
    assert len(values) == 3 and all(1.0 <= v <= 64.0 + 1e-4 for v in values)  # 64 patch tokens
    # uniform attention: zero keys give exp(H) = number of patch tokens
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn.qkv.weight)
        torch.nn.init.zeros_(block.attn.qkv.bias)
    assert block_attention_perplexity(model, torch.randn(2, 1, 16, 16)) == pytest.approx([64.0] * 3, rel=1e-4)


def first_block_perplexity(model, x, queries: str) -> float:
    """The first block's mean attention perplexity over patch keys computed from its weights: ``queries="cls"``
    the class token's, ``"patches"`` every patch token's (heads, queries and images averaged)."""
    tokens = model._pos_embed(model.patch_embed(x))
    attn, prefix = model.blocks[0].attn, model.num_prefix_tokens
    b, n, _ = tokens.shape
    q, k, _ = attn.qkv(model.blocks[0].norm1(tokens)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q = q[:, :, :1] if queries == "cls" else q[:, :, prefix:]
    p = (q @ k[:, :, prefix:].transpose(-1, -2) * attn.scale).softmax(dim=-1)
    return float(torch.exp(-(p * p.log()).sum(dim=-1)).mean(dim=(1, 2)).mean())


def test_block_perplexity_reads_the_class_token_or_without_one_every_patch_token(monkeypatch):
    """A model without a class token (timm's SigLIP-gap ViTs) has no query that reads for its head: the budget
    is calibrated on the patch tokens' own attention, averaged over them, in chunks of images that change nothing."""
    from quickmerge.vision import budget
    from tests.vision.adapters.test_timm_vit import tiny_vit

    torch.manual_seed(0)
    x = torch.randn(5, 1, 16, 16)
    with_cls = tiny_vit(fused=True).eval()
    no_cls = tiny_vit(fused=True, class_token=False, global_pool="avg").eval()
    with torch.no_grad():
        for block in [*with_cls.blocks, *no_cls.blocks]:  # sharper attention than random weights give
            block.attn.qkv.weight.mul_(20.0)
        assert block_attention_perplexity(with_cls, x)[0] == pytest.approx(first_block_perplexity(with_cls, x, "cls"),
                                                                          rel=1e-5)
        values = block_attention_perplexity(no_cls, x)
        assert values[0] == pytest.approx(first_block_perplexity(no_cls, x, "patches"), rel=1e-5)
        assert values[0] != pytest.approx(first_block_perplexity(no_cls, x, "cls"), rel=0.02)  # not token 0's
        monkeypatch.setattr(budget, "_LOGITS_PER_CHUNK", 1)  # one image at a time
        assert block_attention_perplexity(no_cls, x, batch_size=2) == pytest.approx(values, rel=1e-6)
        assert all(1.0 <= v <= 64.0 + 1e-4 for v in values) and len(values) == 3
        schedule = entropy_schedule(values, 64, 16)  # the budget runs on it
        with quickmerge_patch(no_cls, r=schedule) as handle:
            no_cls(x)
        assert sum(64 - t for t in handle.tokens_per_layer) > 0


SHIPPED_VIT = [32.4, 167.2, 33.4, 45.6, 31.5, 24.9]  # the shipped ViT's block perplexities (calibration images)


def test_hard_schedules_are_shaped_where_the_first_block_reaches_its_cap():
    """At r >= 80 the focused blocks ask for more than the cap before the wide one has merged its share; the
    search used to stop there and hand back constant r, labelled an entropy schedule."""
    from quickmerge.vision.budget import schedule_cost, token_counts

    for r, bipartite in ((80, True), (96, True), (150, False)):
        schedule = entropy_schedule(SHIPPED_VIT, 196, r, bipartite=bipartite)
        constant = token_counts(196, [float(r)] * 6, bipartite=bipartite)
        assert schedule != [constant[i] - constant[i + 1] for i in range(6)]
        assert schedule[1] < schedule[0]  # the block that reads widely merges less
        counts = token_counts(196, [float(x) for x in schedule], bipartite=bipartite)
        assert schedule_cost(constant) - 12 <= schedule_cost(counts) <= schedule_cost(constant)


def test_a_schedule_can_be_asked_for_by_its_share_of_the_unmerged_cost():
    from quickmerge.vision.budget import schedule_cost, token_counts

    full = schedule_cost([196] * 7)
    for cost, bipartite in ((0.5, True), (0.3, False), (1.0, True)):
        schedule = entropy_schedule(SHIPPED_VIT, 196, cost=cost, bipartite=bipartite)
        spent = schedule_cost(token_counts(196, [float(x) for x in schedule], bipartite=bipartite)) / full
        assert cost - 0.01 <= spent <= cost
    assert entropy_schedule(SHIPPED_VIT, 196, cost=1.0) == [0] * 6
    with pytest.raises(ValueError, match=r"at least 0\.2\d\d of the unmerged cost, every block merging half"):
        entropy_schedule(SHIPPED_VIT, 196, cost=0.1)
    with pytest.raises(ValueError, match="exactly one of r"):
        entropy_schedule(SHIPPED_VIT, 196, 16, cost=0.5)
    with pytest.raises(ValueError, match="exactly one of r"):
        entropy_schedule(SHIPPED_VIT, 196)
    with pytest.raises(ValueError, match=r"cost must be .* in \(0, 1\]"):
        entropy_schedule(SHIPPED_VIT, 196, cost=1.5)


def test_a_constant_schedule_stops_at_the_cap_or_the_floor():
    assert constant_schedule(196, 16, 6) == [16] * 6
    assert constant_schedule(196, 120, 6, bipartite=False) == [120, 68, 0, 0, 0, 0]  # 196 -> 76 -> 8 (the floor)
    assert constant_schedule(196, 120, 6) == [98, 49, 24, 12, 5, 0]  # half of each block's tokens, then the floor
    assert constant_schedule(196, 120, 6, 2, bipartite=False) == [120, 74, 0, 0, 0, 0]
