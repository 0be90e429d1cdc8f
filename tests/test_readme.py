"""The README's Python snippets run as written against the library (an API rename breaks this test, not a user).

Each ```python block is found by its first line that is not an import, and run in a namespace holding only what the
README leaves to the reader (a model, its inputs); a block this file does not know fails the test, so a new snippet
gets checked.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks() -> dict[str, str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return {next(line for line in block.splitlines() if line and not line.startswith(("import ", "from "))): block
            for block in blocks}


def _attention_maps(b: int, n: int, layers: int = 2, heads: int = 2) -> list[torch.Tensor]:
    return [torch.randn(b, heads, n, n).softmax(-1) for _ in range(layers)]


def _core() -> dict:
    from quickmerge import QuickMergePP

    torch.manual_seed(0)
    return {"qm": QuickMergePP(embedding_dim=32), "hidden_states": torch.randn(2, 12, 32), "K": 4,
            "model_outputs": type("Outputs", (), {"attentions": _attention_maps(2, 12)})()}


def _causal_lm() -> dict:
    from tests.text.tiny import tiny

    model = tiny("llama")
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    return {"model": model, "context_ids": ids[:, :32], "next_ids": ids[:, 32:],
            "prompts": [ids[:, :20], ids[:, 20:36]]}


def _press_only() -> dict:
    from quickmerge import QuickMergePress

    return {"QuickMergePress": QuickMergePress}


def _vision() -> dict:
    pytest.importorskip("safetensors")
    return {"images": torch.randn(2, 1, 28, 28), "photo": torch.rand(112, 112, 3).numpy()}


def _vision_schedule() -> dict:
    pytest.importorskip("safetensors")
    import quickmerge
    from quickmerge.pretrained.fashion_vit import load_fashion_vit

    return {"quickmerge": quickmerge, "model": load_fashion_vit(), "calibration_images": torch.randn(8, 1, 28, 28),
            "images": torch.randn(4, 1, 28, 28)}


def _timm_feature_maps() -> dict:
    pytest.importorskip("timm")
    return {"images": torch.randn(2, 3, 224, 224)}


def _vision_language() -> dict:
    pytest.importorskip("transformers")
    from tests.text.test_kv_press import _image_prompt
    from tests.text.tiny import tiny

    ids, types, pixels = _image_prompt(batch=1)

    def processor(images, text, return_tensors):  # a stand-in for the model's processor: one image, tokenised
        assert images is pixels and return_tensors == "pt"
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
                "token_type_ids": types}

    return {"model": tiny("gemma3-vlm"), "processor": processor, "image": pixels, "prompt": "Describe the image."}


def _video_transformer() -> dict:
    """VideoMAE-Base's architecture with random weights (none can be downloaded here) for ``from_pretrained``, and a
    stand-in for its video processor: 16 frames of 224 x 224."""
    transformers = pytest.importorskip("transformers")
    import quickmerge

    class Hub:  # the snippet's ``transformers``, loading the architecture its checkpoint names
        VideoMAEForVideoClassification = type("Loader", (), {"from_pretrained": staticmethod(
            lambda name: transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(
                num_labels=400, attn_implementation="sdpa")).eval())})

    def processor(frames, return_tensors):
        assert len(frames) == 16 and return_tensors == "pt"
        return {"pixel_values": torch.stack(frames)[None]}

    torch.manual_seed(0)
    return {"transformers": Hub, "quickmerge": quickmerge, "processor": processor,
            "frames": torch.rand(16, 3, 224, 224)}


def _video() -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    return {}


RUN = {
    "qm = QuickMergePP(embedding_dim=512)": dict,
    "out = qm(hidden_states, K, attentions=model_outputs.attentions)": _core,
    "press = QuickMergePress(compression_ratio=0.5)  # kvpress-style press, per call": _causal_lm,
    "press = QuickMergePress(compression_ratio=0.0, decoding_size=192, decoding_interval=64)  # the prompt kept "
    "whole": _causal_lm,
    'press = QuickMergePress(compression_ratio=0.5, scoring="replay", budget="replay",': _press_only,
    'press = QuickMergePress(compression_ratio=0.5, scoring="replay", budget="replay", head_budgets=True,': _press_only,
    'press = QuickMergePress(compression_ratio=0.5, scoring="replay", budget="replay", head_budgets=True)':
        _press_only,
    "model = load_fashion_vit()                 # or a timm ViT or Eva, a HF ViT / DeiT / DINOv2 / DINOv3, "
    "a CLIP tower": _vision,
    "perplexity = block_attention_perplexity(model, calibration_images)  # [blocks]: effective tokens the class "
    "token reads": _vision_schedule,
    'handle = quickmerge.patch(model, r=16)  # = similarity="hidden", saliency_rule="scaled"': _vision_schedule,
    "budget = ImageBudget.calibrate(calibration_images, patch_size=2, num_tokens=196, num_layers=6, r=24)  "
    "# 4 buckets": _vision_schedule,
    'model = timm.create_model("vit_small_patch16_224", features_only=True, out_indices=(5, 8, 11))':
        _timm_feature_maps,
    "press = QuickMergeInputPress(compression_ratio=0.75, layer=-1,   # -1: merge the embeddings, before layer 0":
        _vision_language,
    'model, tokenizer, fmt = load_ar("video")                 # shipped in quickmerge/assets/ar_video': _video,
    'model = transformers.VideoMAEForVideoClassification.from_pretrained("MCG-NJU/videomae-base-finetuned-kinetics")':
        _video_transformer,
}
# run elsewhere with the real package: tests/text/test_kv_press.py::test_kvpress_pipeline_keeps_proportional_...
# tests/vision/adapters/test_openclip_vit.py::test_the_readme_s_openclip_model_... (no pretrained weights offline)
# tests/vision/adapters/test_timm_eva.py::test_the_readme_s_rotary_models_patch_whole (random weights)
# tests/vision/adapters/test_torchvision_vit.py::test_the_readme_s_vit_b_16_patches_as_said (random weights)
# tests/vision/adapters/test_hf_siglip2.py::test_the_readme_s_naflex_snippet (a tiny tower, the real processor)
# tests/vision/adapters/test_timm_naflex.py::test_the_readme_s_naflex_vit_snippet (a tiny model, timm's collator)
ELSEWHERE = {'pipe = transformers.pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)',
             'model = timm.create_model("vit_base_patch16_rope_mixed_224", pretrained=True)  # or eva02_*, '
             'vit_*_dinov3',
             'model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained="laion2b_s34b_b88k")',
             'model = torchvision.models.vit_b_16(weights="IMAGENET1K_SWAG_LINEAR_V1").eval()',
             'model = transformers.Siglip2VisionModel.from_pretrained("google/siglip2-base-patch16-naflex")',
             'model = timm.create_model("naflexvit_base_patch16_gap.e300_s576_in1k", pretrained=True).eval()'}


def _feature_maps_as_said(namespace: dict) -> None:
    assert [tuple(m.shape) for m in namespace["maps"]] == [(2, 384, 14, 14)] * 3
    assert namespace["handle"].tokens_per_layer[::11] == [197, 109]


def _tubelets_as_said(namespace: dict) -> None:
    assert namespace["handle"].tokens_per_layer == [1568 - 64 * i for i in range(12)]  # 1,568, 64 fewer per block
    assert tuple(namespace["logits"].shape) == (1, 400)


def _cache_bounded_as_said(namespace: dict) -> None:
    press, model = namespace["press"], namespace["model"]
    decoded = namespace["out"].shape[1] - 32 - 1  # calls after the prefill, one entry each
    assert decoded == 299, "the tiny model stopped early: the claim below needs the whole generation"
    # the 32-token prompt kept whole: every layer reaches 192 + 64 entries after 224 calls, again after 288
    assert press.decoding_merges == 2 * model.config.num_hidden_layers


# what a snippet's comments claim, checked after it ran
CLAIMS = {"press = QuickMergePress(compression_ratio=0.0, decoding_size=192, decoding_interval=64)  # the prompt "
          "kept whole": _cache_bounded_as_said,
          'model = timm.create_model("vit_small_patch16_224", features_only=True, out_indices=(5, 8, 11))':
          _feature_maps_as_said,
          'model = transformers.VideoMAEForVideoClassification.from_pretrained("MCG-NJU/videomae-base-finetuned-'
          'kinetics")': _tubelets_as_said}


def test_every_readme_snippet_is_known_to_this_test():
    unknown = set(_blocks()) - set(RUN) - ELSEWHERE
    assert not unknown, f"README snippets this test does not run: {sorted(unknown)}"


@pytest.mark.parametrize("first_line", sorted(RUN), ids=lambda line: line.split("(")[0].split("=")[-1].strip())
def test_readme_snippet_runs(first_line):
    blocks = _blocks()
    assert first_line in blocks, f"the README no longer has a snippet with the line {first_line!r}: update RUN"
    if RUN[first_line] is _causal_lm:
        pytest.importorskip("transformers")
    namespace = RUN[first_line]()
    exec(compile(blocks[first_line], f"README.md: {first_line}", "exec"), namespace)
    CLAIMS.get(first_line, lambda _: None)(namespace)


def test_every_quickmerge_command_in_the_readme_parses():
    """The command lines of the README's shell blocks (``quickmerge ...``, ``-m quickmerge ...``) are accepted."""
    import shlex

    from quickmerge.cli import build_parser

    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split("#")[0])
            if "quickmerge" in words and (words[0] == "quickmerge" or "-m" in words):
                commands.append(words[words.index("quickmerge") + 1 :])
    assert len(commands) >= 10, commands
    for argv in commands:
        build_parser().parse_args(argv)  # exits (fails the test) on a renamed command or flag
