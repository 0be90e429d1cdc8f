"""quickmerge.text.scoring.prompt_saliency, through QuickMergePress(scoring="prompt"), against the model's own
attention weights (eager attention, output_attentions): ObservedAttention's score with entropy weights."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import QuickMergePress  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from tests.text.tiny import tiny  # noqa: E402


def _reference_kept(attn: torch.Tensor, kept: int, salient: str, hkv: int) -> torch.Tensor:
    """``[Hkv, kept]`` sorted indices of the top entries: attention received from every later query,
    weighted, over the weight of the queries that see it; mean over each KV head's query heads."""
    h, length, _ = attn.shape
    support = torch.arange(1, length + 1, dtype=torch.float32)
    entropy = -torch.special.xlogy(attn, attn).sum(-1) / support.log().clamp_min(1e-12)  # [H, L]
    entropy[:, 0] = 0.0
    weight = {"uniform": torch.ones_like(entropy), "low_entropy": 1 - entropy, "high_entropy": entropy}[salient]
    received = (weight[..., None] * attn).sum(1)  # [H, L]
    observers = torch.flip(torch.cumsum(torch.flip(weight, [1]), 1), [1])  # weight of queries i >= j
    score = (received / observers).view(hkv, h // hkv, length).mean(1)
    return score.topk(kept, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen3-moe", "mixtral", "phi3", "smollm3"])
@pytest.mark.parametrize("salient", ["uniform", "low_entropy", "high_entropy"])
def test_prompt_scoring_keeps_the_entries_the_model_attends_to(kind, salient):
    model = tiny(kind, attn="eager", layers=2)
    ids = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    full = transformers.DynamicCache()
    with torch.no_grad():
        attentions = model(ids, **cache_kwargs(model, full), output_attentions=True).attentions
    press = QuickMergePress(0.5, scoring="prompt", salient=salient, kernel_size=1, proportional=False,
                            epsilon=1e-9)
    cache = transformers.DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, **cache_kwargs(model, cache))
    for layer, (merged, plain) in enumerate(zip(cache.layers, full.layers, strict=True)):
        hkv = plain.keys.shape[1]
        want = _reference_kept(attentions[layer][0].float(), 15, salient, hkv)
        assert torch.allclose(merged.keys[0], plain.keys[0].gather(1, want[..., None].expand(-1, -1, 16)), atol=1e-5)


def test_neighbourhood_max_equals_a_loop_reference():
    from quickmerge.text.scoring import neighbourhood_max

    scores = torch.randn(2, 3, 11)
    for width in (1, 3, 9):
        want = torch.stack([scores[..., max(0, j - width // 2) : j + width // 2 + 1].amax(-1) for j in range(11)], -1)
        assert torch.equal(neighbourhood_max(scores, width), want)


def test_key_leverage_equals_the_ridge_formula_and_finds_an_outlier():
    """x_i^T (X^T X + lambda I)^-1 x_i on centred keys, lambda = ridge x mean eigenvalue; a key pushed far
    from the rest has the highest leverage of its head, and a shift of every key changes nothing."""
    from quickmerge.text.scoring import key_leverage

    torch.manual_seed(0)
    keys = torch.randn(2, 3, 50, 8) * torch.linspace(0.2, 2.0, 8)
    keys[1, 2, 17] += 15.0 * torch.randn(8)
    got = key_leverage(keys, ridge=0.5)
    for b in range(2):
        for h in range(3):
            x = keys[b, h].double() - keys[b, h].double().mean(0)
            gram = x.T @ x
            want = torch.diag(x @ torch.linalg.inv(gram + 0.5 * gram.trace() / 8 * torch.eye(8, dtype=x.dtype)) @ x.T)
            assert torch.allclose(got[b, h].double(), want, atol=1e-5)
    assert got[1, 2].argmax() == 17
    assert torch.allclose(key_leverage(keys + 3.0, ridge=0.5), got, atol=1e-5)
    assert ((got >= 0) & (got < 1)).all()


def test_the_window_ranks_first_and_in_the_order_of_the_attention_it_receives():
    """A window the budget cannot keep whole (a one-frame window of a video at 0.75) is cut by its own received
    attention, not by a tie order: the window's entries rank above every other one, among themselves as received."""
    from quickmerge.text.scoring import Window, saliency

    b, h, w, length = 1, 2, 6, 10
    probs = torch.rand(b, h, w, length, generator=torch.Generator().manual_seed(0))
    probs = torch.tril(probs, diagonal=length - w)  # causal: query i sees keys 0 .. L - w + i
    probs = probs / probs.sum(-1, keepdim=True)
    ranks = saliency(Window(torch.zeros(b, h, w, 4), probs, 1.0), h, salient="uniform", kernel_size=1)  # a KV head each
    received = probs.sum(2)  # uniform query weights
    for head in range(h):
        order = ranks[0, head].argsort(descending=True).tolist()
        window = list(range(length - w, length))
        assert sorted(order[:w]) == window  # the window first
        assert order[:w] == sorted(window, key=lambda i: -float(received[0, head, i]))  # by what it receives
        assert order[w:] == sorted(range(length - w), key=lambda i: -float(received[0, head, i]))
