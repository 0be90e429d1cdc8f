import pytest
import torch

from quickmerge.baselines import bipartite_round, tome_merge

from ..conftest import naive_group_means

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [196, 600])
def test_tied_edges_merge_the_lowest_a_tokens_first(dtype, t):
    """Identical tokens tie on every edge: the r merged A tokens are the first r, on every device (argsort's
    own order among ties is the CPU's 61, 73, 72, ... of 98 and another on CUDA)."""
    x = torch.ones(2, t, 8, dtype=dtype)
    x[1, 100:] = torch.randn(t - 100, 8).to(dtype)  # the second row: ties among its first 50 A tokens only
    r, ta = 40, (t + 1) // 2
    new_a = bipartite_round(x, r)[:, ::2]
    assert torch.equal(new_a[0, :r], torch.full((r,), ta - r))  # merged into B token 0, the first best match
    assert torch.equal(new_a[0, r:], torch.arange(ta - r))
    merged = (new_a[1] >= ta - r).nonzero().flatten()
    assert torch.equal(merged, torch.arange(r))  # the tied ones (edge 1.0) first, lowest first


@pytest.mark.parametrize("n,k", [(10, 3), (1024, 256), (7, 7), (5, 1), (33, 16)])
def test_tome_merge_reaches_k_with_size_weighted_means(n, k):
    x = torch.randn(2, n, 6, dtype=torch.float64)
    merged, assignment, sizes = tome_merge(x, k)
    assert merged.shape == (2, k, 6)
    assert torch.equal(sizes.sum(-1), torch.full((2,), n)) and sizes.min() >= 1
    expected = naive_group_means(x, torch.ones(2, n), assignment, k)
    assert torch.allclose(merged, expected, atol=1e-9)


def test_round_merges_most_similar_pairs_and_protects_first():
    x = torch.tensor([[[1.0, 0], [1.0, 0.01], [0, 1.0], [-1.0, 0.2]]])
    idx = bipartite_round(x, 1)
    assert idx[0, 0] == idx[0, 1]  # the near-duplicate pair merged
    idx = bipartite_round(x, 1, protect_first=True)
    assert idx[0, 0] != idx[0, 1]
    with pytest.raises(ValueError, match="r must be at most"):
        bipartite_round(x, 3)


@pytest.mark.parametrize("share", [0.5, 0.25, 0.1])
def test_capped_rounds_protect_the_first_token_and_reach_k(share):
    x = torch.randn(3, 64, 8, dtype=torch.float64)
    merged, assignment, sizes = tome_merge(x, 32, protect_first=True, max_round_share=share)
    assert merged.shape == (3, 32, 8) and torch.equal(sizes.sum(-1), torch.full((3,), 64))
    assert (assignment[:, 0] == 0).all() and (sizes[:, 0] == 1).all()  # token 0 alone in group 0
    assert torch.allclose(merged, naive_group_means(x, torch.ones(3, 64), assignment, 32), atol=1e-9)
    with pytest.raises(ValueError, match="max_round_share"):
        tome_merge(x, 32, max_round_share=0.9)


def test_at_half_a_single_uncapped_round_merges_every_even_token():
    """Why the KV baseline caps its rounds: ToMe's one round at 50% has no choice to make."""
    x = torch.randn(1, 16, 4, dtype=torch.float64)
    _, assignment, _ = tome_merge(x, 8)
    evens_alone = [(assignment[0] == assignment[0, i]).sum() == 1 for i in range(0, 16, 2)]
    assert not any(evens_alone)
    _, capped, _ = tome_merge(x, 8, protect_first=True, max_round_share=0.25)
    assert (capped[0] == capped[0, 0]).sum() == 1


@pytest.mark.parametrize("n,k", [(2, 1), (3, 1), (4, 1), (3, 2), (5, 2)])
def test_tiny_inputs_with_a_protected_first_token_terminate_at_k(n, k):
    """A protected token 0 leaves no A token to merge at t=2: the last round joins token 1 to it."""
    x = torch.randn(2, n, 4, dtype=torch.float64)
    merged, assignment, sizes = tome_merge(x, k, protect_first=True, max_round_share=0.25)
    assert merged.shape == (2, k, 4) and torch.equal(sizes.sum(-1), torch.full((2,), n))
    assert (assignment[:, 0] == 0).all()
    assert torch.allclose(merged, naive_group_means(x, torch.ones(2, n), assignment, k), atol=1e-9)


def test_padding_goes_first_and_is_never_a_real_tokens_match():
    torch.manual_seed(0)
    x = torch.randn(4, 20, 6)
    padding = torch.zeros(4, 20, dtype=torch.bool)
    padding[:, 12:] = True  # 4 padding tokens in each set
    idx = bipartite_round(x, 6, padding=padding)
    a = idx[:, ::2]
    merged_a = a >= 10 - 6  # A tokens that went into a B token
    assert merged_a[:, 6:].all()  # every padding A token merged, whatever its match
    assert merged_a[:, :6].sum(1).eq(2).all()  # the remaining two merges are real
    real_matches = a[:, :6][merged_a[:, :6]] - (10 - 6)  # their B tokens
    assert (real_matches < 6).all()  # real B tokens (B index 6.. are padding)
    x[padding] = 1e3 * torch.randn(int(padding.sum()), 6)  # what padding holds changes no real token's group
    again = bipartite_round(x, 6, padding=padding)
    assert torch.equal(again[:, :12], idx[:, :12])
    assert not torch.equal(bipartite_round(x, 6), idx)  # without the mask it does


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("options", ["plain", "penalty", "cost_scale", "padding", "protect_first"])
def test_bipartite_round_in_chunks_of_images_gives_the_assignment_of_one_pass(monkeypatch, dtype, options):
    from quickmerge.baselines import tome

    g = torch.Generator().manual_seed(5)
    b, t, c = 7, 21, 8  # odd T: one more A token than B tokens
    metric = torch.randn(b, t, c, generator=g).to(dtype)
    metric[:, 3] = metric[:, 5]  # exact ties in every image
    kwargs = {}
    if options == "penalty":
        kwargs["penalty"] = torch.rand(b, t, generator=g)
    elif options == "cost_scale":
        kwargs["cost_scale"] = torch.rand(b, t, generator=g)
    elif options == "padding":
        padding = torch.zeros(b, t, dtype=torch.bool)
        padding[1::2, 15:] = True  # every other image padded
        kwargs["padding"] = padding
    elif options == "protect_first":
        kwargs["protect_first"] = True
    whole = bipartite_round(metric, 9, **kwargs)
    per_image = t * c + 2 * 11 * 10
    monkeypatch.setattr(tome, "_ELEMENTS_PER_CHUNK", 2 * per_image)  # chunks of 2 images, the last one alone
    monkeypatch.setattr(tome, "_STATES_TO_SPLIT", 1)  # every round splits
    assert tome.images_per_chunk(b, t, c, options == "cost_scale") == 2
    assert torch.equal(bipartite_round(metric, 9, **kwargs), whole)
    assert not torch.equal(whole[0], whole[2])  # images differ: a chunk's rows cannot stand in for another's


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", ["scaled", "large states", "small plain"])
def test_bipartite_round_chunks_images_on_a_cpu_where_it_pays(monkeypatch, device, case):
    from quickmerge.baselines import tome

    seen = []

    def one_chunk(metric, r, *args):
        seen.append(metric.shape[0])
        return torch.zeros(metric.shape[:2], dtype=torch.long, device=metric.device)

    monkeypatch.setattr(tome, "_bipartite_round", one_chunk)
    monkeypatch.setattr(tome, "_ELEMENTS_PER_CHUNK", 2 * (20 * 8 + 2 * 10 * 10))
    monkeypatch.setattr(tome, "_STATES_TO_SPLIT", 7 * 20 * 8 + (case != "large states"))
    cost_scale = torch.rand(7, 20, device=device) if case == "scaled" else None
    dst = bipartite_round(torch.randn(7, 20, 8, device=device), 5, cost_scale=cost_scale)
    # a GPU (any device but a CPU) gains no cache hits from chunks, only launches: the batch goes at once; so does a
    # small plain round on a CPU (ToMe-style's keys), where the chunks' per-call overhead costs more than they save
    assert seen == ([2, 2, 2, 1] if device == "cpu" and case != "small plain" else [7]) and dst.shape == (7, 20)


def test_bipartite_round_checks_r_before_any_chunk():
    with pytest.raises(ValueError, match=r"ceil\(T/2\)=10"):
        bipartite_round(torch.randn(300, 20, 8), 11)


def test_a_compiled_round_takes_the_batch_whole(monkeypatch):
    """Chunks unroll into a compiled graph (compile time) and buy nothing there: traced, the batch goes whole."""
    from quickmerge.baselines import tome

    monkeypatch.setattr(tome, "_ELEMENTS_PER_CHUNK", 1)
    assert tome.images_per_chunk(7, 20, 8, scaled=True) == 1
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert tome.images_per_chunk(7, 20, 8, scaled=True) == 7


def test_a_compiled_split_round_gives_the_eager_assignment(monkeypatch):
    from quickmerge.baselines import tome

    g = torch.Generator().manual_seed(2)
    metric, scale = torch.randn(5, 16, 8, generator=g), torch.rand(5, 16, generator=g)
    monkeypatch.setattr(tome, "_ELEMENTS_PER_CHUNK", 2 * (16 * 8 + 2 * 8 * 8))  # eager: chunks of 2 images
    eager = bipartite_round(metric, 6, cost_scale=scale)
    compiled = torch.compile(lambda m, s: bipartite_round(m, 6, cost_scale=s), backend="eager", fullgraph=True)
    assert torch.equal(compiled(metric, scale), eager)
