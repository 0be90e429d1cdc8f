"""quickmerge.patch on the Hugging Face BLIP, BLIP-2 and InstructBLIP vision towers (tiny random configs): BLIP's
written-out attention (eager only) and the others' attention interface (eager and SDPA)."""

import warnings

import pytest
import torch

import quickmerge
from quickmerge.vision import get_handle
from quickmerge.vision.adapters import HFBlipAdapter, find_adapter

transformers = pytest.importorskip("transformers")

FAMILIES = {"BlipVisionModel": "BlipVisionConfig", "Blip2VisionModel": "Blip2VisionConfig",
            "InstructBlipVisionModel": "InstructBlipVisionConfig",
            "InstructBlipVideoVisionModel": "InstructBlipVideoVisionConfig"}
VISION = dict(image_size=16, patch_size=2, num_channels=3, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, initializer_range=0.02)  # the families default to 1e-10: near-zero blocks
# BLIP's attention is written out (no implementation to choose); the others' go through the attention interface
CASES = [("BlipVisionModel", "eager")] + [(name, impl) for name in list(FAMILIES)[1:] for impl in ("eager", "sdpa")]


def tiny(cls_name: str, impl: str = "eager", **settings) -> torch.nn.Module:
    config = getattr(transformers, FAMILIES[cls_name])(**{**VISION, **settings}, attn_implementation=impl)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config).eval()


def flat_image() -> torch.Tensor:
    return torch.full((2, 3, 16, 16), -0.4)


@pytest.mark.parametrize("cls_name,impl", CASES)
def test_r0_is_exact_and_unpatch_restores(cls_name, impl):
    model, x = tiny(cls_name, impl), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(pixel_values=x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a tested class
            handle = quickmerge.patch(model, r=0)
        assert isinstance(find_adapter(model), HFBlipAdapter) and handle.num_prefix_tokens == 1
        out = model(pixel_values=x)
        assert torch.allclose(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
        assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)
        handle.r = 12
        merged = model(pixel_values=x)
        assert handle.tokens_per_layer == [65, 53, 41] and merged.last_hidden_state.shape[1] == 29
        assert not torch.allclose(merged.pooler_output, ref.pooler_output, atol=1e-3)
    quickmerge.unpatch(model)
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).pooler_output, ref.pooler_output)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("cls_name,impl", CASES)
def test_proportional_attention_makes_merging_duplicates_exact(cls_name, impl):
    # a flat image, positions zeroed: every patch token is a copy; merged with their sizes counted in the attention
    # (BLIP: its probabilities re-weighted), the class token and the kept copies are what they were unmerged
    model = tiny(cls_name, impl)
    with torch.no_grad():
        model.embeddings.position_embedding.zero_()
        ref = model(pixel_values=flat_image())
        with quickmerge.patch(model, r=20, method="pool") as handle:
            merged = model(pixel_values=flat_image())
            assert handle.tokens_per_layer == [65, 45, 25]
            assert torch.allclose(merged.last_hidden_state, ref.last_hidden_state[:, :5], atol=1e-5, rtol=0)
            assert torch.allclose(merged.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
            handle.prop_attn = False  # each copy counted once: the class token attends to another mix
            unweighted = model(pixel_values=flat_image())
            assert not torch.allclose(unweighted.pooler_output, ref.pooler_output, atol=1e-3)


def test_blips_attention_gets_the_probabilities_of_logits_plus_log_size():
    # the dropout pre-hook's re-weighting against softmax(q k^T * scale + log size), computed here from what qkv
    # returned, in the second block: the first merged 16 tokens, the others merge none (the sizes stay)
    model, x = tiny("BlipVisionModel"), torch.randn(2, 3, 16, 16)
    attention = model.encoder.layers[1].self_attn
    seen = {}
    with torch.no_grad(), quickmerge.patch(model, r=[16, 0, 0], method="tome") as handle:
        attention.qkv.register_forward_hook(lambda _m, _a, out: seen.update(qkv=out))
        attention.dropout.register_forward_hook(lambda _m, _a, out: seen.update(probs=out))
        model(pixel_values=x)
    b, n, _ = seen["qkv"].shape
    q, k, _ = seen["qkv"].reshape(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * attention.scale
    assert n == 49 and handle.sizes.shape == (2, 49) and handle.sizes.max() > 1
    expected = torch.softmax(logits + handle.sizes.log()[:, None, None, :], dim=-1)
    assert torch.allclose(seen["probs"], expected, atol=1e-6, rtol=0)
    assert not torch.allclose(seen["probs"], torch.softmax(logits, dim=-1), atol=1e-3)


@pytest.mark.parametrize("method", ["quickmerge", "tome"])
def test_blips_written_out_attention_merges_as_blip2s_attention_interface_on_the_same_weights(method):
    # the same function in both (BLIP-2's qkv has no key bias: BLIP's is zeroed); what BLIP's hooks read off qkv
    # and re-weight after the softmax must give BLIP-2's merges and outputs, whose attention function gets q, k
    blip, blip2 = tiny("BlipVisionModel"), tiny("Blip2VisionModel", "sdpa", layer_norm_eps=1e-5)
    weights = blip.state_dict()
    for name, value in weights.items():
        if name.endswith("qkv.bias"):
            value[32:64] = 0
    blip.load_state_dict(weights)
    blip2.load_state_dict(weights)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad(), quickmerge.patch(blip, r=12, method=method) as ours, \
            quickmerge.patch(blip2, r=12, method=method) as theirs:
        out, ref = blip(pixel_values=x), blip2(pixel_values=x)
    assert torch.equal(ours.sizes, theirs.sizes) and ours.sizes.max() > 1
    assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)


def test_hidden_states_are_the_merged_blocks_inputs():
    if transformers.__version__.startswith("5.0."):
        pytest.skip("transformers 5.0 records hidden states inside the layers: refused (test_hf_vit.py)")
    for cls_name, impl in CASES[:2]:
        model = tiny(cls_name, impl)
        with torch.no_grad(), quickmerge.patch(model, r=8) as handle:
            out = model(pixel_values=torch.randn(2, 3, 16, 16), output_hidden_states=True)
        assert [h.shape[1] for h in out.hidden_states] == [*handle.tokens_per_layer, 41]


WHOLE = {"Blip2ForConditionalGeneration": "Blip2Config", "Blip2Model": "Blip2Config",
         "InstructBlipForConditionalGeneration": "InstructBlipConfig",
         "InstructBlipVideoForConditionalGeneration": "InstructBlipVideoConfig"}


def tiny_whole(cls_name: str, impl: str = "eager") -> torch.nn.Module:
    """A BLIP-2 / InstructBLIP model: a 2-layer tower, a Q-Former cross-attending in both its layers, a tiny OPT."""
    config = getattr(transformers, WHOLE[cls_name])(
        vision_config={**VISION, "num_hidden_layers": 2},
        qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            encoder_hidden_size=32, vocab_size=99, max_position_embeddings=16,
                            cross_attention_frequency=1),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=4,
                         vocab_size=99, word_embed_proj_dim=32, max_position_embeddings=32),
        num_query_tokens=4, image_token_index=98)
    for sub in (config.vision_config, config.text_config):
        sub._attn_implementation = impl
    qformer = getattr(transformers, cls_name.replace("ForConditionalGeneration", "").replace("Model", "")
                      + "QFormerModel")
    config.qformer_config._attn_implementation = impl if qformer._supports_sdpa else "eager"  # 5.2: eager only
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.zero_()
    return model


def two_regions(video: bool = False) -> torch.Tensor:
    x = torch.full((2, 3, 16, 16), -0.4)
    x[:, :, :, 12:] = 0.7
    return x[:, None].expand(-1, 2, -1, -1, -1) if video else x  # InstructBLIP-Video: [B, frames, C, H, W]


def image_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the Q-Former returns: its query outputs (projected for the language model, but in ``Blip2Model``)."""
    name = type(model).__name__
    extra = {} if "Blip2" in name else {"qformer_input_ids": torch.tensor([[1, 5, 6]] * 2)}
    read = (model.get_qformer_features if name == "Blip2Model" else
            model.get_video_features if "Video" in name else model.get_image_features)
    out = read(pixel_values=x, **extra)
    for field in ("pooler_output", "last_hidden_state"):  # the releases return a tensor, a tuple or an output
        if (name != "Blip2Model" or field == "last_hidden_state") and getattr(out, field, None) is not None:
            return getattr(out, field)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cls_name", list(WHOLE))
def test_a_whole_model_merges_in_its_tower_and_its_q_former_reads_the_merged_tokens_by_size(cls_name, impl):
    # merging copies (two flat regions, positions zeroed) leaves what the Q-Former returns exact only if its
    # cross-attention weighs each merged token by the patches it stands for
    model, x = tiny_whole(cls_name, impl), two_regions("Video" in cls_name)
    with torch.no_grad():
        ref = image_features(model, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a tested class
            handle = quickmerge.patch(model, r=[16, 12], method="tome")
        merged = image_features(model, x)
        assert handle.tokens_per_layer == [65, 49] and handle.sizes.shape[1] == 37
        assert torch.allclose(merged, ref, atol=1e-5 * ref.abs().max(), rtol=0)
        handle.size_weighted_pool = False  # the Q-Former reads each merged token once
        assert not torch.allclose(image_features(model, x), ref, atol=1e-3 * ref.abs().max())
        handle.size_weighted_pool = True
        if hasattr(model, "generate") and "Video" not in cls_name:
            extra = {} if "Blip2" in cls_name else {"qformer_input_ids": torch.tensor([[1, 5, 6]] * 2)}
            assert model.generate(pixel_values=x, max_new_tokens=2, **extra).shape[0] == 2
    quickmerge.unpatch(model)
    with torch.no_grad():
        assert torch.equal(image_features(model, x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_the_tower_patched_alone_feeds_the_q_former_each_merged_token_once():
    model, x = tiny_whole("Blip2ForConditionalGeneration"), two_regions()
    read = []  # what the Q-Former's cross-attention reads
    model.qformer.register_forward_pre_hook(lambda _m, a, kw: read.append(kw["encoder_hidden_states"]),
                                            with_kwargs=True)
    with torch.no_grad():
        ref = image_features(model, x)
        with quickmerge.patch(model.vision_model, r=[16, 12], method="tome"):
            alone = image_features(model, x)
    assert read[0].shape[1] == 65 and read[1].shape[1] == 37
    assert not torch.allclose(alone, ref, atol=1e-2 * ref.abs().max())


def test_the_q_formers_mask_keeps_what_it_masks_and_gets_log_size_added():
    # called on the last pass's tokens, a cross-attention's mask becomes log(size), plus -inf where a boolean mask
    # says False or where a float mask has it: the same answer whichever form the mask takes
    model, x = tiny_whole("Blip2ForConditionalGeneration"), torch.randn(2, 3, 16, 16)
    attention = model.qformer.encoder.layer[0].crossattention.attention
    queries = torch.randn(2, 4, 32)
    with torch.no_grad(), quickmerge.patch(model, r=[16, 12]) as handle:
        tokens = model.vision_model(pixel_values=x).last_hidden_state
        keep = torch.ones(2, 1, 1, tokens.shape[1], dtype=torch.bool)
        keep[:, :, :, 3] = False
        floats = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
        by_bool = attention(queries, encoder_hidden_states=tokens, encoder_attention_mask=keep)[0]
        by_float = attention(queries, encoder_hidden_states=tokens, encoder_attention_mask=floats)[0]
        everything = attention(queries, encoder_hidden_states=tokens, encoder_attention_mask=None)[0]
        handle.size_weighted_pool = False
        unweighted = attention(queries, encoder_hidden_states=tokens, encoder_attention_mask=floats)[0]
    assert torch.allclose(by_bool, by_float, atol=1e-6) and not torch.allclose(by_float, everything, atol=1e-4)
    assert not torch.allclose(by_float, unweighted, atol=1e-4)


def test_a_q_former_without_cross_attention_is_refused_before_any_hook():
    model = tiny_whole("Blip2ForConditionalGeneration")
    for layer in model.qformer.encoder.layer:
        del layer.crossattention
    with pytest.raises(TypeError, match=r"patch model\.vision_model alone"):
        quickmerge.patch(model, r=4)
    assert get_handle(model) is None and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


BLIP_WHOLE = ("BlipForConditionalGeneration", "BlipForQuestionAnswering", "BlipForImageTextRetrieval")


def tiny_blip(cls_name: str) -> torch.nn.Module:
    """A BLIP model: a 2-layer tower, a 2-layer text transformer cross-attending in every layer."""
    config = transformers.BlipConfig(
        vision_config={**VISION, "num_hidden_layers": 2},
        text_config=dict(vocab_size=99, hidden_size=32, encoder_hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                         initializer_range=0.02, bos_token_id=1, sep_token_id=2, eos_token_id=2, pad_token_id=0))
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.zero_()
    return model


QUESTION = torch.tensor([[1, 5, 6, 7]] * 2)


def blip_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What reads the image: the caption's logits, the question's encoding (VQA's decoder reads that), the
    image-text matching score."""
    name = type(model).__name__
    if name == "BlipForConditionalGeneration":
        return model(pixel_values=x, input_ids=QUESTION).logits
    if name == "BlipForQuestionAnswering":
        images = model.vision_model(pixel_values=x).last_hidden_state
        return model.text_encoder(input_ids=QUESTION, encoder_hidden_states=images).last_hidden_state
    return model(pixel_values=x, input_ids=QUESTION).itm_score


@pytest.mark.parametrize("cls_name", BLIP_WHOLE)
def test_a_whole_blip_model_merges_in_its_tower_and_its_text_reads_the_merged_tokens_by_size(cls_name):
    model, x = tiny_blip(cls_name), two_regions()
    settings = {} if cls_name == "BlipForConditionalGeneration" else {"input_ids": QUESTION}
    with torch.no_grad():
        ref = blip_output(model, x)
        beams = (1, 2) if hasattr(model, "generate") else ()  # retrieval generates nothing
        captions = [model.generate(pixel_values=x, max_new_tokens=4, num_beams=b, **settings) for b in beams]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a tested class
            handle = quickmerge.patch(model, r=[16, 12], method="tome")
        assert torch.allclose(blip_output(model, x), ref, atol=1e-5 * ref.abs().max(), rtol=0)
        assert handle.tokens_per_layer == [65, 49] and handle.sizes.shape == (2, 37)
        for b, caption in zip(beams, captions, strict=True):  # greedy, and beams repeating the image
            assert torch.equal(model.generate(pixel_values=x, max_new_tokens=4, num_beams=b, **settings), caption)
        handle.size_weighted_pool = False  # the text reads each merged token once
        assert not torch.allclose(blip_output(model, x), ref, atol=1e-4 * ref.abs().max())
    quickmerge.unpatch(model)
    with torch.no_grad():
        assert torch.equal(blip_output(model, x), ref)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def record_cross_attention_masks(text: torch.nn.Module) -> list:
    """The ``encoder_attention_mask`` each cross-attention of ``text`` is called with (after quickmerge's hook: a
    pre-hook registered after patching runs after it)."""
    masks = []
    for name, module in text.named_modules():
        if name.endswith("crossattention.self"):
            module.register_forward_pre_hook(lambda _m, _a, kw: masks.append(kw.get("encoder_attention_mask")),
                                             with_kwargs=True)
    return masks


def test_beam_search_repeats_each_images_sizes_for_its_beams():
    # generation repeats every image's tokens per beam (images in order): the mask the captioning decoder's
    # cross-attention gets holds the sizes repeated alike; VQA's decoder, which reads the question's encoding, none
    model = tiny_blip("BlipForConditionalGeneration")
    with torch.no_grad(), quickmerge.patch(model, r=[16, 12], method="tome") as handle:
        masks = record_cross_attention_masks(model.text_decoder)
        model.generate(pixel_values=torch.randn(2, 3, 16, 16), max_new_tokens=3, num_beams=3)
    assert masks and all(m is not None and m.shape == (6, 1, 1, 37) for m in masks)
    assert torch.allclose(masks[0].exp()[:, 0, 0], handle.sizes.repeat_interleave(3, dim=0))
    model = tiny_blip("BlipForQuestionAnswering")
    with torch.no_grad(), quickmerge.patch(model, r=[16, 12], method="tome") as handle:
        encoder, decoder = record_cross_attention_masks(model.text_encoder), record_cross_attention_masks(
            model.text_decoder)
        model.generate(pixel_values=torch.randn(2, 3, 16, 16), input_ids=QUESTION, max_new_tokens=3, num_beams=3)
    assert encoder and all(m is not None and m.shape == (2, 1, 1, 37) for m in encoder)
    assert torch.allclose(encoder[0].exp()[:, 0, 0], handle.sizes)
    assert decoder and all(m is None for m in decoder)


def test_gradient_checkpointing_refuses_to_train():
    model = tiny("BlipVisionModel")
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    with quickmerge.patch(model, r=8):
        model.train()
        with pytest.raises(RuntimeError, match="gradient checkpointing"):
            model(pixel_values=torch.randn(2, 3, 16, 16)).pooler_output.sum().backward()


def test_flash_attention_and_a_blip_attention_without_its_dropout_are_refused_before_any_hook():
    model = tiny("Blip2VisionModel", "sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        quickmerge.patch(model, r=4)
    assert get_handle(model) is None and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model = tiny("BlipVisionModel")
    del model.encoder.layers[2].self_attn.dropout
    with pytest.raises(TypeError, match="no dropout module"):
        quickmerge.patch(model, r=4)
    assert get_handle(model) is None and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_a_blip_attention_reached_neither_way_is_refused_before_any_hook():
    # a release whose BLIP attention neither calls the attention interface nor takes its own softmax and dropout
    # (as its code reads) must not be hooked the old way, where the re-weighting would silently never run
    model = tiny("BlipVisionModel")
    attention = model.encoder.layers[1].self_attn

    class Fused(type(attention)):
        def forward(self, hidden_states, **kwargs):
            q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
            return self.projection(torch.nn.functional.scaled_dot_product_attention(q, k, v)), None

    attention.__class__ = Fused
    with pytest.raises(TypeError, match=r"Fused\.forward neither calls"):
        quickmerge.patch(model, r=4)
    assert get_handle(model) is None and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
