"""The learned saliency: zero changes nothing, a keep score protects tokens, it trains through the relaxed merge
only, it is a submodule only while patched, and it saves and loads."""

import pytest
import torch

import quickmerge
from quickmerge.vision import TokenScorer
from quickmerge.vision.token_merge import quickmerge_assign, quickmerge_bipartite_assign

pytest.importorskip("timm")
from tests.vision.adapters.test_timm_vit import tiny_vit

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_a_zero_scorer_changes_nothing_and_a_trained_one_changes_the_merges():
    vit, x = tiny_vit(fused=True), torch.randn(2, 1, 16, 16)
    with quickmerge.patch(vit, r=6, saliency_rule="additive", trace_source=True) as handle:
        plain, source = vit(x), handle.source
    scorer = TokenScorer(3, 32)
    with quickmerge.patch(vit, r=6, scorer=scorer, trace_source=True) as handle:
        assert handle.saliency_rule == "additive"  # the rule a scorer is trained with, not the default scaled one
        assert torch.equal(vit(x), plain) and torch.equal(handle.source, source)
        with torch.no_grad():
            scorer.weight.normal_(0, 5.0, generator=torch.Generator().manual_seed(0))
        vit(x)
        assert not torch.equal(handle.source, source)


def test_a_high_keep_score_keeps_a_token_out_of_every_merge():
    gen = torch.Generator().manual_seed(0)
    metric, sal = torch.randn(2, 30, 8, generator=gen), torch.rand(2, 30, generator=gen)
    # bipartite: of the 15 even (source) tokens 12 merge away; protect two of them
    plain = quickmerge_bipartite_assign(metric, sal, 12, 0.5)
    gone = [t for t in range(0, 30, 2) if plain[0, t] >= 3][:2]  # kept sources are numbered 0-2
    protect = torch.zeros(2, 30)
    protect[0, gone] = 10.0
    protected = quickmerge_bipartite_assign(metric, sal, 12, 0.5, protect)
    assert all(protected[0, t] < 3 for t in gone) and torch.equal(protected[1], plain[1])
    # greedy: the removed tokens are returned; protect two of them
    _, removed = quickmerge_assign(metric, sal, 12, 0.5, return_removed=True)
    protect = torch.zeros(2, 30)
    protect[0, removed[0, :2]] = 10.0
    _, now = quickmerge_assign(metric, sal, 12, 0.5, return_removed=True, keep_score=protect)
    assert not set(removed[0, :2].tolist()) & set(now[0].tolist())
    assert set(now[1].tolist()) == set(removed[1].tolist())


def test_the_scorer_trains_through_the_relaxed_merge_only():
    vit, x = tiny_vit(fused=True), torch.randn(2, 1, 16, 16)
    scorer = TokenScorer(3, 32)
    with quickmerge.patch(vit, r=4, scorer=scorer, temperature=0.5):
        vit.train()
        vit(x).square().sum().backward()
        assert scorer.weight.grad is not None and scorer.weight.grad.abs().sum() > 0
        scorer.zero_grad()
        vit.eval()  # the hard merge: a selection, no gradient to the scores
        vit(x).square().sum().backward()
        assert scorer.weight.grad is None or scorer.weight.grad.abs().sum() == 0


def test_the_scorer_is_a_submodule_only_while_patched_and_is_checked(tmp_path):
    pytest.importorskip("safetensors")
    vit = tiny_vit(fused=True)
    keys = set(vit.state_dict())
    scorer = TokenScorer(3, 32)
    with torch.no_grad():
        scorer.weight.uniform_(-1, 1)
    with quickmerge.patch(vit, r=4, scorer=scorer):
        assert set(vit.state_dict()) == keys | {"quickmerge_scorer.weight"}
        assert any(p is scorer.weight for p in vit.parameters())
    assert set(vit.state_dict()) == keys and not hasattr(vit, "quickmerge_scorer")
    scorer.save(tmp_path)
    assert torch.equal(TokenScorer.load(tmp_path).weight, scorer.weight)
    with pytest.raises(ValueError, match="scorer has 2 layers, the model 3 blocks"):
        quickmerge.patch(vit, r=4, scorer=TokenScorer(2, 32))
    with pytest.raises(TypeError, match=r"scorer must be a quickmerge\.vision\.TokenScorer"):
        quickmerge.patch(vit, r=4, scorer=torch.nn.Linear(32, 1))
    with quickmerge.patch(vit, r=4, scorer=TokenScorer(3, 16)), pytest.raises(ValueError, match="16 channels"):
        vit(torch.randn(1, 1, 16, 16))
    assert quickmerge.vision.get_handle(vit) is None
