import pytest
import torch
import torch.nn.functional as F

from quickmerge.vision.token_merge import (
    attention_saliency,
    in_first_member_order,
    pool_assign,
    quickmerge_assign,
    quickmerge_bipartite_assign,
    random_assign,
)

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_quickmerge_assign_keeps_one_token_per_group_and_joins_the_nearest():
    b, n, r = 3, 40, 15
    metric, sal = torch.randn(b, n, 8), torch.rand(b, n)
    dst, removed = quickmerge_assign(metric, sal, r, saliency_weight=0.5, return_removed=True)
    assert dst.shape == (b, n) and dst.min() == 0 and dst.max() == n - r - 1
    mn = F.normalize(metric, dim=-1)
    for i in range(b):
        assert (torch.bincount(dst[i], minlength=n - r) >= 1).all()
        # removed: the r highest redundancy - weight * saliency rank, computed naively here, where of
        # two mutually nearest tokens only the one with the higher score may be removed
        sim = mn[i] @ mn[i].T
        nearest = [max((u for u in range(n) if u != t), key=lambda u, t=t: float(sim[t, u])) for t in range(n)]
        score = [float(sim[t, nearest[t]]) - 0.5 * float((sal[i] < sal[i, t]).sum()) / (n - 1) for t in range(n)]
        partner_goes = [nearest[nearest[t]] == t and (score[nearest[t]], nearest[t]) > (score[t], t) for t in range(n)]
        allowed = [t for t in range(n) if not partner_goes[t]]
        assert set(removed[i].tolist()) == set(sorted(allowed, key=lambda t: -score[t])[:r])
        kept = torch.tensor(sorted(set(range(n)) - set(removed[i].tolist())))
        assert torch.equal(dst[i, kept], torch.arange(n - r))  # kept tokens numbered in order
        for t in removed[i]:
            assert dst[i, t] == (mn[i, t] @ mn[i, kept].T).argmax()  # joined its most similar kept token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_matching_removes_tied_tokens_lowest_index_first(dtype):
    """Identical tokens tie on every pair: token 0 stays (of the mutual pair 0-1 the later one goes), tokens 1..r
    go, each into token 0, the first of its most similar kept tokens; the same on every device."""
    metric, r = torch.ones(2, 196, 8, dtype=dtype), 48
    dst, removed = quickmerge_assign(metric, torch.rand(2, 196), r, saliency_weight=0.0, return_removed=True)
    assert torch.equal(removed, torch.arange(1, r + 1).expand(2, r))
    assert (dst[:, : r + 1] == 0).all() and torch.equal(dst[:, r + 1 :], torch.arange(1, 196 - r).expand(2, -1))


def test_past_the_tokens_the_mutual_rule_allows_the_held_ones_go_by_their_own_score():
    """Four mutually nearest pairs (cosines 0.9, 0.99, 0.8, 0.95): of each pair one may go, and with r = 6 the
    first of the two most similar pairs go too, not whichever a top-k over -inf picks."""
    metric = torch.zeros(1, 8, 8)
    for pair, cos in enumerate((0.9, 0.99, 0.8, 0.95)):
        metric[0, 2 * pair, pair] = 1.0
        metric[0, 2 * pair + 1, pair], metric[0, 2 * pair + 1, pair + 4] = cos, (1 - cos**2) ** 0.5
    removed = quickmerge_assign(metric, torch.rand(1, 8), 6, saliency_weight=0.0, return_removed=True)[1]
    assert set(removed[0].tolist()) == {1, 3, 5, 7, 2, 6}
    assert set(removed[0, :4].tolist()) == {1, 3, 5, 7}  # the allowed ones first


def test_greedy_matching_refuses_an_r_that_leaves_no_token():
    with pytest.raises(ValueError, match=r"r must lie in \[0, 4\].*got 5"):
        quickmerge_assign(torch.randn(1, 5, 4), torch.rand(1, 5), 5, saliency_weight=0.5)
    assert quickmerge_assign(torch.randn(1, 5, 4), torch.rand(1, 5), 4, saliency_weight=0.5).unique().tolist() == [0]


def test_salient_tokens_are_not_merged_away_when_saliency_dominates():
    b, n, r = 2, 30, 7
    metric = torch.randn(b, n, 8)
    sal = torch.rand(b, n)
    _, removed = quickmerge_assign(metric, sal, r, saliency_weight=100.0, return_removed=True)
    top = sal.topk(n - 2 * r, dim=-1).indices  # mutual-pair protection can push at most r further down
    for i in range(b):
        assert set(removed[i].tolist()).isdisjoint(set(top[i].tolist())), "a top-saliency token was merged away"


def test_of_two_duplicates_only_one_is_merged_away():
    metric = torch.eye(8)[None].clone()
    metric[0, 5] = metric[0, 2]  # tokens 2 and 5 are identical: both maximally redundant
    dst, removed = quickmerge_assign(metric, torch.rand(1, 8), 2, saliency_weight=0.0, return_removed=True)
    assert len({2, 5} & set(removed[0].tolist())) == 1 and dst[0, 2] == dst[0, 5]


def test_without_saliency_the_most_redundant_tokens_merge():
    # two exact duplicates and otherwise orthogonal tokens: the duplicate pair merges first
    metric = torch.eye(6)[None].repeat(1, 1, 1)
    metric[0, 4] = metric[0, 1]
    dst = quickmerge_assign(metric, torch.rand(1, 6), 1, saliency_weight=0.0)
    assert dst[0, 1] == dst[0, 4]
    assert len(dst[0].unique()) == 5


def test_bipartite_variant_is_tome_at_zero_weight_and_protects_salient_sources():
    from quickmerge.baselines.tome import bipartite_round

    metric, sal = torch.randn(3, 40, 8), torch.rand(3, 40)
    assert torch.equal(quickmerge_bipartite_assign(metric, sal, 12, 0.0), bipartite_round(metric, 12))
    dst = quickmerge_bipartite_assign(metric, sal, 12, 100.0)
    for i in range(3):
        merged_away = [t for t in range(0, 40, 2) if (dst[i] == dst[i, t]).sum() > 1 and dst[i, t] >= 20 - 12]
        # the 12 merged sources (set A = even positions) are A's 12 least salient tokens
        least = set(sorted(range(0, 40, 2), key=lambda t: float(sal[i, t]))[:12])
        assert set(merged_away) == least


def test_scaled_rule_costs_dissimilarity_times_attention_so_salient_duplicates_still_merge():
    from quickmerge.baselines.tome import bipartite_round

    metric, sal = torch.randn(3, 40, 8), torch.rand(3, 40)
    sal = sal / sal.sum(-1, keepdim=True)
    assert torch.equal(quickmerge_bipartite_assign(metric, sal, 12, 0.0, rule="scaled"), bipartite_round(metric, 12))
    # A = even positions, B = odd. Token 0 is the most salient and an exact duplicate of B token 1; token 2 is
    # barely salient and nearly (not exactly) a duplicate of token 3; every other pair is orthogonal.
    metric = torch.eye(8)[None].clone()
    metric[0, 0] = metric[0, 1]
    metric[0, 2] = F.normalize(metric[0, 3] + 0.05 * metric[0, 7], dim=-1)
    sal = torch.tensor([[0.60, 0.05, 0.01, 0.05, 0.08, 0.08, 0.08, 0.05]])
    additive = quickmerge_bipartite_assign(metric, sal, 1, 0.5)
    scaled = quickmerge_bipartite_assign(metric, sal, 1, 0.5, rule="scaled")
    assert additive[0, 2] == additive[0, 3] and additive[0, 0] != additive[0, 1]  # saliency rank protects 0
    assert scaled[0, 0] == scaled[0, 1] and scaled[0, 2] != scaled[0, 3]  # cost 0 whatever the attention
    with pytest.raises(ValueError, match="additive rule"):
        quickmerge_bipartite_assign(metric, sal, 1, 0.5, torch.zeros(1, 8), rule="scaled")


def test_greedy_scaled_rule_ranks_pairs_by_cost_so_salient_duplicates_still_merge():
    metric, sal = torch.randn(3, 30, 8), torch.rand(3, 30)
    sal = sal / sal.sum(-1, keepdim=True)
    for weight, same in ((0.0, True), (2.0, False)):  # weight 0: cosine order, as the additive rule's
        scaled = quickmerge_assign(metric, sal, 9, weight, rule="scaled")
        assert torch.equal(scaled, quickmerge_assign(metric, sal, 9, weight)) == same
    # tokens 0 and 5 are exact duplicates and the most salient; 2 and 3 are near duplicates and barely salient
    metric = torch.eye(8)[None].clone()
    metric[0, 5] = metric[0, 0]
    metric[0, 2] = F.normalize(metric[0, 3] + 0.05 * metric[0, 7], dim=-1)
    sal = torch.tensor([[0.40, 0.05, 0.01, 0.01, 0.08, 0.30, 0.08, 0.07]])
    additive = quickmerge_assign(metric, sal, 1, 0.5)
    _, removed = quickmerge_assign(metric, sal, 1, 0.5, rule="scaled", return_removed=True)
    assert additive[0, 2] == additive[0, 3] and additive[0, 0] != additive[0, 5]  # saliency rank protects 0 and 5
    assert int(removed[0, 0]) in (0, 5)  # cost 0 whatever the attention: one of the duplicates goes
    with pytest.raises(ValueError, match="additive rule"):
        quickmerge_assign(metric, sal, 1, 0.5, keep_score=torch.zeros(1, 8), rule="scaled")


@pytest.mark.parametrize("dropped", [0, 6])
def test_groups_renumbered_by_their_first_member_keep_every_group(dropped):
    gen = torch.Generator().manual_seed(0)
    b, n, k = 4, 40, 13
    parts = [torch.arange(k).expand(b, k), torch.randint(0, k, (b, n - k - dropped), generator=gen),
             torch.full((b, dropped), -1)]
    dst = torch.cat(parts, 1).gather(1, torch.rand(b, n, generator=gen).argsort(-1))  # every group has a member
    new, order = in_first_member_order(dst, k)
    assert torch.equal(new < 0, dst < 0)
    assert torch.equal(order.gather(1, new.clamp_min(0))[dst >= 0], dst[dst >= 0])  # the same groups
    assert not torch.equal(new, dst)
    for row in new:
        firsts = [int((row == g).nonzero()[0]) for g in range(k)]
        assert firsts == sorted(firsts)
    merged = torch.randn(b, k, 3, generator=gen)  # the merged tokens move with their numbers
    moved = merged.gather(1, order[..., None].expand(-1, -1, 3))
    assert torch.equal(moved.gather(1, new.clamp_min(0)[..., None].expand(-1, -1, 3))[dst >= 0],
                       merged.gather(1, dst.clamp_min(0)[..., None].expand(-1, -1, 3))[dst >= 0])


def test_random_and_pool_assign():
    g = torch.Generator().manual_seed(0)
    dst = random_assign(4, 20, 7, torch.device("cpu"), g)
    assert ((dst == -1).sum(1) == 7).all()
    assert all(torch.equal(row[row >= 0], torch.arange(13)) for row in dst)
    pool = pool_assign(1, 10, 4, torch.device("cpu"))[0]
    assert (pool.diff() >= 0).all() and pool.max() == 5 and len(pool.unique()) == 6


def test_attention_saliency_sums_to_one_and_finds_the_attended_key():
    b, h, n, d = 2, 3, 20, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d) * 0.1
    k[:, :, 7] = q[:, :, 0] * 5  # the class token's query points at key 7
    for source in ("cls", "queries"):
        s = attention_saliency(q, k, d**-0.5, None, source)
        assert s.shape == (b, n) and torch.allclose(s.sum(-1), torch.ones(b), atol=1e-5)
    assert (attention_saliency(q, k, d**-0.5, None, "cls").argmax(-1) == 7).all()


@pytest.mark.parametrize("count,error", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_attention_saliency_refuses_a_bad_query_count(count, error):
    q = k = torch.randn(1, 2, 6, 4)
    with pytest.raises(error, match="num_queries"):
        attention_saliency(q, k, 0.5, None, "queries", num_queries=count)


def _saliency_by_the_definition(q, k, scale, log_size, index, valid=None):
    """softmax, entropy by xlogy, weighted sum: the formula :func:`attention_saliency` computes in fewer passes."""
    logits = (q[:, :, index].double() @ k.double().transpose(-1, -2)) * scale
    if log_size is not None:
        logits = logits + log_size[:, None, None, :].double()
    p = logits.softmax(-1)
    support = torch.tensor(k.shape[2]) if valid is None else valid.sum(1)[:, None, None]
    weight = (1 + torch.special.xlogy(p, p).sum(-1) / support.double().log()).clamp_min(1e-6)
    return (weight[..., None] * p).sum(dim=(1, 2)) / weight.sum(dim=(1, 2))[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_saliency_equals_its_definition(dtype):
    torch.manual_seed(0)
    b, h, n, d = 3, 4, 40, 16
    q, k = (torch.randn(b, h, n, d) * 2).to(dtype), (torch.randn(b, h, n, d) * 2).to(dtype)
    log_size = torch.rand(b, n).mul(3).add(1).floor().log()  # sizes 1-3
    spread = torch.linspace(0, n - 1, 16).long()
    for source, index in (("cls", torch.tensor([0])), ("queries", spread)):
        for bias in (None, log_size):
            got = attention_saliency(q, k, d**-0.5, bias, source).double()
            assert torch.allclose(got, _saliency_by_the_definition(q, k, d**-0.5, bias, index), atol=1e-6)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, 25:] = False  # padding keys: -inf in the bias
    bias = torch.where(valid, log_size, float("-inf"))
    got = attention_saliency(q, k, d**-0.5, bias, "queries", valid=valid).double()
    want = _saliency_by_the_definition(q, k, d**-0.5, bias, spread, valid)  # rows 1-2 spread over all 40 tokens
    assert not got.isnan().any() and torch.allclose(got[1:], want[1:], atol=1e-6)
    want0 = _saliency_by_the_definition(q[:1, :, :25], k[:1, :, :25], d**-0.5, log_size[:1, :25],
                                        torch.linspace(0, 24, 16).long())
    assert torch.allclose(got[0, :25], want0[0], atol=1e-6) and (got[0, 25:] == 0).all()


def test_attention_saliency_holds_for_sharp_and_flat_attention():
    """Logits of very different spreads (a query on one key, a uniform one, a huge offset): the entropy from the
    shifted logits loses nothing to cancellation."""
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 50, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    spread = torch.linspace(0, n - 1, 16).long()
    for scale in (40.0, 1e-4):  # near one-hot rows; near uniform rows (focus ~0, clamped)
        got = attention_saliency(q, k, scale, None, "queries").double()
        assert torch.allclose(got, _saliency_by_the_definition(q, k, scale, None, spread), atol=1e-6)
    offset = torch.full((b, n), 50.0)  # every logit shifted alike (within float32 steps): nothing changes
    assert torch.allclose(attention_saliency(q, k, 0.5, offset, "queries"), attention_saliency(q, k, 0.5, None,
                                                                                               "queries"), atol=1e-6)


def test_attention_saliency_carries_no_gradient():
    """Computed in place for speed: with inputs that require a gradient it must not hand autograd a graph whose
    saved tensors were overwritten (backward would raise)."""
    q, k = torch.randn(2, 3, 10, 4, requires_grad=True), torch.randn(2, 3, 10, 4, requires_grad=True)
    for source in ("cls", "queries", "mean"):
        assert not attention_saliency(q, k, 0.5, None, source, num_queries=4).requires_grad


def test_the_mean_saliency_asks_the_mean_query_over_the_patches():
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 12, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    size = torch.randint(1, 4, (b, n)).float()
    size[1, 9:] = 0  # padding: -inf in the bias, left out of the mean
    bias, valid = size.log(), size > 0
    by_hand = (q * size[:, None, :, None]).sum(2, keepdim=True) / size.sum(1)[:, None, None, None]  # [B, H, 1, d]
    want = _saliency_by_the_definition(by_hand, k, 0.3, bias, torch.tensor([0]), valid)
    got = attention_saliency(q, k, 0.3, bias, "mean", valid=valid).double()
    assert torch.allclose(got, want, atol=1e-6) and (got[1, 9:] == 0).all()
    plain = attention_saliency(q, k, 0.3, None, "mean")
    assert torch.allclose(plain.double(), _saliency_by_the_definition(q.mean(2, keepdim=True), k, 0.3, None,
                                                                      torch.tensor([0])), atol=1e-6)
    assert torch.equal(attention_saliency(q, k, 0.3, None, "mean", num_queries=3), plain)  # one query whatever


def test_attention_saliency_in_batch_chunks_is_the_same(monkeypatch):
    from quickmerge.vision import token_merge

    torch.manual_seed(0)
    b, h, n, d = 7, 2, 30, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    valid = torch.rand(b, n) > 0.2
    bias = torch.where(valid, torch.rand(b, n), float("-inf"))
    whole = {source: attention_saliency(q, k, 0.3, bias, source, num_queries=5, valid=valid)
             for source in ("cls", "queries", "mean")}
    calls = []
    real = token_merge.attention_saliency
    monkeypatch.setattr(token_merge, "_LOGITS_PER_CHUNK", 2 * h * 5 * n)  # two images per chunk
    monkeypatch.setattr(token_merge, "attention_saliency",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    for source in ("cls", "queries", "mean"):
        assert torch.equal(real(q, k, 0.3, bias, source, num_queries=5, valid=valid), whole[source])
    assert calls == [2, 2, 2, 1]  # the queries' chunks (one query, the class token's or the mean, fits 10 images)
    with pytest.raises(ValueError, match="saliency must be one of"):
        real(q, k, 0.3, None, "keys")


def test_attention_saliency_proportional_bias_raises_a_big_token():
    q, k = torch.zeros(1, 1, 5, 4), torch.randn(1, 1, 5, 4)
    size = torch.tensor([[1.0, 1.0, 8.0, 1.0, 1.0]])
    s = attention_saliency(q, k, 1.0, size.log(), "cls")
    assert s.argmax() == 2 and torch.allclose(s[0, 2], torch.tensor(8 / 12), atol=1e-5)


def test_relaxed_bipartite_merge_is_the_hard_merge_forward_and_trains_the_keys():
    from quickmerge.primitives import rank01, weighted_mean
    from quickmerge.vision.token_merge import quickmerge_bipartite_assign, relaxed_bipartite_merge

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=gen, requires_grad=True)
    metric = torch.randn(3, 20, 4, generator=gen, requires_grad=True)
    weight = torch.rand(3, 20, generator=gen) + 0.5
    sal = torch.rand(3, 20, generator=gen)
    merged, dst = relaxed_bipartite_merge(x, weight, metric, 0.5 * rank01(sal), 6, 1e-6)
    hard_dst = quickmerge_bipartite_assign(metric.detach(), sal, 6, 0.5)
    assert torch.equal(dst, hard_dst)  # no noise to speak of: the same merges
    hard, _ = weighted_mean(x, weight, hard_dst, 14)
    assert torch.allclose(merged, hard, atol=1e-5)
    merged, _ = relaxed_bipartite_merge(x, weight, metric, 0.5 * rank01(sal), 6, 0.5,
                                        torch.Generator().manual_seed(1))
    merged.square().sum().backward()
    assert metric.grad is not None and metric.grad.abs().sum() > 0  # the keys get a gradient through rho
    assert x.grad.abs().sum() > 0


def test_relaxed_bipartite_merge_with_the_scaled_rule_is_its_hard_merge_forward_and_passes_cost_gradients():
    from quickmerge.primitives import weighted_mean
    from quickmerge.vision.token_merge import quickmerge_bipartite_assign, relaxed_bipartite_merge, scaled_cost

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 8, generator=gen)
    metric = torch.randn(3, 20, 4, generator=gen, requires_grad=True)
    weight = torch.rand(3, 20, generator=gen) + 0.5
    logits = torch.randn(3, 20, generator=gen, requires_grad=True)
    sal = logits.softmax(-1)
    hard_dst = quickmerge_bipartite_assign(metric.detach(), sal.detach(), 6, 0.5, rule="scaled")
    assert not torch.equal(hard_dst, quickmerge_bipartite_assign(metric.detach(), sal.detach(), 6, 0.5))
    merged, dst = relaxed_bipartite_merge(x, weight, metric, None, 6, 1e-6, cost_scale=scaled_cost(sal, 0.5))
    assert torch.equal(dst, hard_dst)
    assert torch.allclose(merged, weighted_mean(x, weight, hard_dst, 14)[0], atol=1e-5)
    merged, _ = relaxed_bipartite_merge(x, weight, metric, None, 6, 0.5, torch.Generator().manual_seed(1),
                                        cost_scale=scaled_cost(sal, 0.5))
    merged.square().sum().backward()
    assert metric.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0  # through the cosines and the cost factors


def test_temperature_trains_through_the_relaxed_merge_only_in_training():
    import quickmerge
    from tests.vision.adapters.test_timm_vit import tiny_vit

    vit = tiny_vit(fused=True)
    x = torch.randn(2, 1, 16, 16)
    with quickmerge.patch(vit, r=4, temperature=0.5) as handle:
        vit.eval()
        with torch.no_grad():
            plain = vit(x)
        assert torch.allclose(vit(x), plain, atol=1e-5)  # eval: the hard merge, gradients or not
        vit.train()
        out = vit(x)
        out.sum().backward()
        assert handle.tokens_per_layer[-1] < handle.tokens_per_layer[0]
    vit.train(False)
    with pytest.raises(ValueError, match="temperature"):
        quickmerge.patch(vit, r=4, temperature=0.0)


@pytest.mark.parametrize("rule", ["additive", "scaled"])
def test_greedy_matching_in_chunks_of_images_gives_the_groups_of_one_pass(monkeypatch, rule):
    from quickmerge.vision import token_merge

    g = torch.Generator().manual_seed(3)
    x, sal = torch.randn(7, 20, 8, generator=g), torch.rand(7, 20, generator=g).softmax(-1)
    keep = torch.randn(7, 20, generator=g) if rule == "additive" else None
    whole = token_merge.quickmerge_assign(x, sal, 9, 0.5, return_removed=True, keep_score=keep, rule=rule)
    monkeypatch.setattr(token_merge, "_PAIRS_PER_CHUNK", 2 * 20 * 20)  # chunks of 2 images, the last one alone
    chunked = token_merge.quickmerge_assign(x, sal, 9, 0.5, return_removed=True, keep_score=keep, rule=rule)
    assert torch.equal(chunked[0], whole[0]) and torch.equal(chunked[1], whole[1])
    assert not torch.equal(whole[0][0], whole[0][1])  # images differ: a chunk's rows cannot stand in for another's


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_greedy_matching_chunks_images_on_a_cpu_only(monkeypatch, device):
    from quickmerge.vision import token_merge

    seen = []

    def groups(metric, saliency, r, *args):
        seen.append(metric.shape[0])
        b, n, _ = metric.shape
        return torch.zeros(b, n, dtype=torch.long), torch.zeros(b, r, dtype=torch.long)

    monkeypatch.setattr(token_merge, "_greedy_groups", groups)
    monkeypatch.setattr(token_merge, "_PAIRS_PER_CHUNK", 2 * 20 * 20)
    x, sal = torch.randn(7, 20, 8, device=device), torch.rand(7, 20, device=device)
    dst = token_merge.quickmerge_assign(x, sal, 9, 0.5)
    # a GPU (any device but a CPU) gains no cache hits from chunks, only launches: the batch goes at once
    assert seen == ([2, 2, 2, 1] if device == "cpu" else [7]) and dst.shape == (7, 20)


def test_padding_is_removed_first_never_decides_and_saliency_reads_real_queries():
    torch.manual_seed(0)
    b, n, real = 3, 24, 15
    metric, sal = torch.randn(b, n, 8), torch.rand(b, n)
    padding = torch.zeros(b, n, dtype=torch.bool)
    padding[:, real:] = True
    noisy = metric.clone()
    noisy[padding] = 1e3 * torch.randn(int(padding.sum()), 8)
    # what padding holds changes no real token's group
    groups = quickmerge_bipartite_assign(metric, sal, 12, 0.5, padding=padding)
    assert torch.equal(quickmerge_bipartite_assign(noisy, sal, 12, 0.5, padding=padding)[:, :real], groups[:, :real])
    greedy = quickmerge_assign(metric, sal, 12, 0.5, padding=padding)
    assert torch.equal(quickmerge_assign(noisy, sal, 12, 0.5, padding=padding)[:, :real], greedy[:, :real])
    assert not torch.equal(quickmerge_assign(noisy, sal, 12, 0.5)[:, :real], greedy[:, :real])
    _, removed = quickmerge_assign(metric, sal, 9, 0.5, padding=padding, return_removed=True)
    assert torch.equal(removed.sort(1).values, torch.arange(real, n).expand(b, -1))  # all padding, nothing else
    dst = random_assign(b, n, 9, torch.device("cpu"), torch.Generator().manual_seed(0), padding)
    assert (dst[:, real:] == -1).all() and (dst[:, :real] >= 0).all()
    # saliency: padding keys masked by the bias, queries spread over the real tokens only
    h, d = 2, 8
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    bias = torch.where(padding, float("-inf"), 0.0)
    s = attention_saliency(q, k, 0.3, bias, "queries", num_queries=5, valid=~padding)
    q2 = q.clone()
    q2[:, :, real:] = 1e3 * torch.randn(b, h, n - real, d)
    assert torch.equal(attention_saliency(q2, k, 0.3, bias, "queries", num_queries=5, valid=~padding), s)
    assert (s[:, real:] == 0).all() and torch.allclose(s.sum(1), torch.ones(b))
    assert not torch.equal(attention_saliency(q2, k, 0.3, bias, "queries", num_queries=5), s)
