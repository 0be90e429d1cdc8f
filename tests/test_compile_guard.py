"""torch.compile never runs a stale graph around quickmerge's hooks (TorchDynamo skips hook guards by default)."""

import copy
import warnings

import pytest
import torch

import quickmerge

pytest.importorskip("timm")
from tests.vision.adapters.test_timm_vit import tiny_vit


@pytest.fixture
def dynamo_defaults():
    """TorchDynamo as a fresh process has it: no hook guards, no compiled graphs."""
    import torch._dynamo

    torch.compiler.reset()
    torch._dynamo.utils.counters.clear()  # its statistics: what guard_hooks reads to know if anything was compiled
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=True):
        yield
    torch.compiler.reset()  # leave no graph behind, and no count of graphs that would make a later patch warn
    torch._dynamo.utils.counters.clear()


@torch.no_grad()
def test_a_model_compiled_before_it_is_patched_merges_once_patched(dynamo_defaults):
    model, x = tiny_vit(True), torch.randn(4, 1, 16, 16)
    compiled = torch.compile(model, backend="eager")
    compiled(x)  # a graph without hooks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = quickmerge.patch(model, r=8)
    y = compiled(x)
    assert handle.tokens_per_layer == [65, 57, 49]  # the hooks ran inside the compiled call
    assert torch.allclose(y, model(x), atol=1e-6)
    handle.remove()
    assert torch.allclose(compiled(x), model(x), atol=1e-6)  # and unpatching is seen too
    assert len(caught) == 1 and "cleared torch.compile's caches (1 graph(s))" in str(caught[0].message)


@torch.no_grad()
def test_a_patched_copy_of_a_compiled_model_does_not_reuse_its_graph(dynamo_defaults):
    plain, x = tiny_vit(True), torch.randn(4, 1, 16, 16)
    patched = copy.deepcopy(plain)
    torch.compile(plain, backend="eager")(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the cache reset's warning: checked above
        quickmerge.patch(patched, r=8)
    assert torch.allclose(torch.compile(patched, backend="eager")(x), patched(x), atol=1e-6)
    assert not torch.allclose(patched(x), plain(x), atol=1e-4)  # merging changes the output: the check can fail


def test_hook_guards_are_turned_on_once_and_silently_when_nothing_was_compiled(dynamo_defaults):
    import torch._dynamo

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quickmerge.patch(tiny_vit(True), r=8)
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False
        torch.compile(tiny_vit(True), backend="eager")(torch.randn(1, 1, 16, 16))
        quickmerge.patch(tiny_vit(True), r=8)  # already guarded: no reset, no warning


@torch.no_grad()
def test_a_press_compresses_the_cache_of_a_compiled_causal_lm(dynamo_defaults, tmp_path):
    """QuickMergePress's hooks inside a compiled LM (compiled before the press): the same cache and logits as eager."""
    transformers = pytest.importorskip("transformers")
    from quickmerge import QuickMergePress
    from quickmerge.text.cache import cache_kwargs
    from tests.eval.conftest import save_tiny_lm

    model = transformers.AutoModelForCausalLM.from_pretrained(save_tiny_lm(tmp_path)).eval()
    prompt, follow = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0)), torch.tensor([[5, 6]])
    compiled = torch.compile(model, backend="eager")
    compiled(prompt)  # a graph without the press's hooks

    def run(forward):
        press, cache = QuickMergePress(compression_ratio=0.5), transformers.DynamicCache()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the cache reset's warning, checked above
            with press(model):
                forward(prompt, **cache_kwargs(model, cache))
                logits = forward(follow, **cache_kwargs(model, cache)).logits
        return logits, press.compressed_length

    (eager, kept), (fast, kept_compiled) = run(model), run(compiled)
    assert kept == kept_compiled == 32 and torch.allclose(eager, fast, atol=1e-5)
