"""The presses on the open vision-language models most run (tests/text/tiny_vlm.py): LLaVA 1.5, LLaVA-NeXT,
LLaVA-NeXT-Video, LLaVA-OneVision, PaliGemma 1 and 2, Idefics3, SmolVLM, InternVL and Aya Vision, each with an image
(LLaVA-NeXT-Video and one LLaVA-OneVision case: a clip) in the prompt."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from quickmerge.text import SUPPORTED_ARCHITECTURES, QuickMergeInputPress, QuickMergePress  # noqa: E402
from quickmerge.text.cache import cache_kwargs  # noqa: E402
from quickmerge.text.decoder import attention_of, base_model, decoder_layers, sliding_window_of  # noqa: E402
from tests.text.tiny import duplicated_cache  # noqa: E402
from tests.text.tiny_vlm import IMAGE, KINDS, prompt, vision_language  # noqa: E402


def _decode(model, ids, inputs, cont, press=None):
    """Prefill ``ids`` with the image inputs (inside ``press`` where given), then decode ``cont`` on the cache: the
    continuation's logits and the cache."""
    cache = transformers.DynamicCache()
    if press is None:
        model(ids, **inputs, **cache_kwargs(model, cache))
        return model(cont, **cache_kwargs(model, cache)).logits, cache
    with press(model):
        model(ids, **inputs, **cache_kwargs(model, cache))
        return model(cont, **cache_kwargs(model, cache)).logits, cache


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_kv_press_merges_the_cache_of_a_prompt_with_an_image(kind, attn):
    """Listed, so no untested-class warning; ratio 0 exact (against the model's own cached decoding: PaliGemma's
    one-call forward differs from it without any press); after merging, decoding equals the duplicated-cache
    oracle and the global layers hold fewer entries; ``generate`` runs inside the press."""
    built = vision_language(kind, attn)
    model = built.model
    assert type(model).__name__ in SUPPORTED_ARCHITECTURES
    ids, inputs = prompt(built)
    cont = torch.randint(1, 90, (2, 4), generator=torch.Generator().manual_seed(1))
    n = ids.shape[1]
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference, _ = _decode(model, ids, inputs, cont)
        other = {**inputs, **built.pixels(2, torch.Generator().manual_seed(2))}  # another image, the same text
        assert not torch.allclose(reference, _decode(model, ids, other, cont)[0], atol=1e-4)  # the image is read
        assert torch.allclose(_decode(model, ids, inputs, cont, QuickMergePress(0.0))[0], reference, atol=1e-5)
        press, cache = QuickMergePress(0.5), transformers.DynamicCache()
        with press(model):
            model(ids, **inputs, **cache_kwargs(model, cache))
            oracle = duplicated_cache(cache)  # every merged entry repeated by its size, read by the plain model
            merged = model(cont, **cache_kwargs(model, cache)).logits
            generated = model.generate(ids, **inputs, max_new_tokens=3, do_sample=False)
        assert torch.allclose(merged, model(cont, **cache_kwargs(model, oracle)).logits, atol=1e-5)
    assert not [str(w.message) for w in caught if "untested" in str(w.message)]
    layers = decoder_layers(model)
    global_layers = [i for i, layer in enumerate(layers) if sliding_window_of(attention_of(layer)) is None]
    assert global_layers and all(cache.layers[i].keys.shape[2] < n + 4 for i in global_layers)
    assert generated.shape == (2, n + 3)


@pytest.mark.parametrize("kind", KINDS)
def test_the_input_press_merges_the_image_tokens_only(kind):
    """``QuickMergeInputPress(token_ids=(image token,))`` after layer 0: every layer above holds as many tokens as the
    text plus half the image's (rounded down) and reads them at prefill, then the continuation; ratio 0 exact."""
    built = vision_language(kind)
    model = built.model
    ids, inputs = prompt(built, batch=1)
    cont = torch.randint(1, 90, (1, 4), generator=torch.Generator().manual_seed(1))
    n, image = ids.shape[1], built.image_tokens
    seen = []

    def upper(_module, args, kwargs):
        seen.append(kwargs.get("hidden_states", args[0] if args else None).shape[1])

    with torch.no_grad():
        reference, _ = _decode(model, ids, inputs, cont)
        exact, _ = _decode(model, ids, inputs, cont, QuickMergeInputPress(0.0, layer=0, token_ids=(IMAGE,)))
        handle = decoder_layers(model)[1].register_forward_pre_hook(upper, with_kwargs=True)
        try:
            _, cache = _decode(model, ids, inputs, cont, QuickMergeInputPress(0.5, layer=0, token_ids=(IMAGE,)))
        finally:
            handle.remove()
    assert torch.allclose(exact, reference, atol=1e-5)
    kept = n - image + int(image * 0.5)  # the press keeps int(k (1 - ratio)) of k image tokens
    assert [layer.keys.shape[2] for layer in cache.layers] == [n + 4] + [kept + 4] * (len(cache.layers) - 1)
    assert seen == [kept, 4]  # layer 1 runs the merged prompt, then the continuation on the merged cache
    assert base_model(model) is getattr(model.model, "language_model", getattr(model.model, "text_model", None))


@pytest.mark.parametrize("decoder,tower", [("eager", "sdpa"), ("sdpa", "eager")])
def test_the_press_runs_the_decoder_s_own_attention_and_leaves_every_implementation_as_it_was(decoder, tower):
    """A vision-language model whose decoder runs another attention implementation than its tower (PaliGemma 2's
    eager Gemma 2 beside an SDPA SigLIP; the model's own config names one for all): inside the press the decoder
    runs its own (SDPA through the grouped path), the tower its own; afterwards every config says what it said."""
    built = vision_language("llava")
    model = built.model
    model.set_attn_implementation({"text_config": decoder, "vision_config": tower})
    configs = (model.config, model.config.text_config, model.config.vision_config)
    before = [c._attn_implementation for c in configs]
    ids, inputs = prompt(built)
    seen = {}

    def record(key):
        def hook(module, _args, _kwargs):
            seen[key] = module.config._attn_implementation

        return hook

    decoder_attention = attention_of(decoder_layers(model)[0])
    tower_attention = next(m for m in model.model.vision_tower.modules() if type(m).__name__ == "CLIPAttention")
    handles = [decoder_attention.register_forward_pre_hook(record("decoder"), with_kwargs=True),
               tower_attention.register_forward_pre_hook(record("tower"), with_kwargs=True)]
    with torch.no_grad(), QuickMergePress(0.5)(model):
        model(ids, **inputs, **cache_kwargs(model, transformers.DynamicCache()))
    for handle in handles:
        handle.remove()
    assert seen == {"decoder": "eager" if decoder == "eager" else "quickmerge_sdpa", "tower": tower}
    assert [c._attn_implementation for c in configs] == before


def test_a_decoder_attention_without_float_masks_is_refused_whatever_the_model_s_config_says():
    """The refusal reads the decoder's implementation, not the model's own config (which names the tower's too):
    asked of the whole model before any work (as ``eval text`` asks every method) and at the prompt."""
    built = vision_language("llava")
    model = built.model
    model.set_attn_implementation({"text_config": "flex_attention", "vision_config": "sdpa"})
    assert "'flex_attention' does not take" in (QuickMergePress(0.5).refusal(model) or "")
    ids, inputs = prompt(built)
    with pytest.raises(ValueError, match="'flex_attention' does not take"), torch.no_grad(), \
            QuickMergePress(0.5)(model):
        model(ids, **inputs, **cache_kwargs(model, transformers.DynamicCache()))
