import pytest
import torch
from torch import nn

from quickmerge import CausalPrior, QuickMergePP, quickmerge_inference

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


@pytest.mark.parametrize("b,n,d,k", [(1, 1, 8, 1), (2, 100, 32, 20), (3, 17, 16, 16), (2, 33, 24, 1), (1, 64, 8, 63)])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_shapes_and_losses(b, n, d, k, causal):
    qm = QuickMergePP(d, num_layers=4, causal=causal, prior_dim=16, prior_heads=2)
    merged, losses = out = qm(torch.randn(b, n, d), k)
    assert merged.shape == (b, k, d)
    assert set(losses) == {"ar_forward", "ar_backward", "ar", "fidelity", "total"}
    assert all(isinstance(v, torch.Tensor) and v.shape == () and torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["total"], qm.alpha * losses["ar"] + losses["fidelity"])
    assert out.saliency.shape == (b, n) and out.merge.assignment.shape == (b, n)


@pytest.mark.parametrize("training", [True, False])
def test_gradients_reach_input_and_every_parameter(training):
    qm = QuickMergePP(16, num_layers=3, prior_dim=16, prior_heads=2, gamma=1.0).train(training)
    for p in qm.ar_alignment.parameters():  # leave the zero-initialised heads so all weights get signal
        nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 40, 16, requires_grad=True)
    _, losses = qm(x, 8)
    losses["total"].backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in qm.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_eval_is_deterministic_and_training_is_stochastic():
    qm = QuickMergePP(16, num_layers=3).eval()
    x = torch.randn(2, 50, 16)
    a, b = qm(x, 10), qm(x, 10)
    assert torch.equal(a[0], b[0])
    qm.train()
    outs = [qm.compress(x, 10)[0].seeds for _ in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_real_attention_and_precomputed_saliency_are_used():
    qm = QuickMergePP(8, num_layers=2).eval()
    x = torch.randn(1, 12, 8)
    maps = [torch.rand(1, 2, 12, 12).softmax(-1) for _ in range(3)]
    via_maps = qm(x, 4, attentions=maps)
    via_saliency = qm(x, 4, saliency=via_maps.saliency)
    assert torch.equal(via_maps[0], via_saliency[0])
    with pytest.raises(ValueError, match="either attentions or saliency"):
        qm(x, 4, attentions=maps, saliency=via_maps.saliency)


class CountingModel(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.prior = CausalPrior(d, hidden_dim=16, num_heads=2)
        self.calls = 0

    def forward(self, tokens):
        self.calls += 1
        return self.prior(tokens)


def test_inference_keeps_budget_and_decodes_in_one_causal_pass():
    model = CountingModel(12)
    x = torch.randn(100, 12)
    merged, preds = quickmerge_inference(x, model, entropy_budget=0.2)
    assert merged.shape == (20, 12) and preds.shape == (20, 12)
    assert model.calls == 1
    # Predictions are the model's causal outputs on the merged prefix.
    assert torch.allclose(preds, model.prior(merged[None])[0], atol=1e-6)


def test_inference_passes_inputs_embeds_to_hf_style_models():
    class HFStyle(nn.Module):
        def forward(self, input_ids=None, inputs_embeds=None):
            return type("Out", (), {"logits": inputs_embeds.sum(-1, keepdim=True).cumsum(1)})()

    merged, logits = quickmerge_inference(torch.randn(30, 4), HFStyle(), entropy_budget=0.5)
    assert merged.shape == (15, 4) and logits.shape == (15, 1)


def test_inference_adaptive_budget_never_exceeds_fixed():
    merged, _ = quickmerge_inference(torch.randn(60, 8), CausalPrior(8, 16, 1, 2), 0.5, adaptive=True)
    assert 1 <= merged.shape[0] <= 30


def test_inference_merged_tokens_are_order_preserving_spans():
    qm = QuickMergePP(8, causal=True)
    x = torch.randn(40, 8)
    merged, _ = quickmerge_inference(x, CausalPrior(8, 16, 1, 2), 0.25, quickmerge=qm)
    result, _ = qm.eval().compress(x[None], 10)
    assert torch.equal(merged, result.merged[0])
    assert (result.assignment.diff(dim=1) >= 0).all()


def test_inference_errors():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="causal=True"):
        quickmerge_inference(x, CausalPrior(4, 8, 1, 2), quickmerge=QuickMergePP(4))
    with pytest.raises(TypeError, match="ar_model"):
        quickmerge_inference(x, "not a model")
    with pytest.raises(ValueError, match=r"\[1, K=2"):
        quickmerge_inference(x, lambda t: t[:, :1], 0.2)
