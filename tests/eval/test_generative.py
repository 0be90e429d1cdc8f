"""``quickmerge eval image`` / ``eval video`` end to end on a tiny model: the text summary schema,
bits per token that match a direct computation, the methods' kept lengths, and clear errors."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from quickmerge.ar.formats import IMAGE, SequenceFormat, to_sequences
from quickmerge.ar.model import build_ar_model
from quickmerge.cli import main
from tests.conftest import write_clip
from tests.eval.conftest import TINY_AR as TINY
from tests.eval.conftest import fashion_test_images_installed, require_usable_kvpress
from tests.eval.conftest import save_tiny_ar as _save

needs_fashion = pytest.mark.skipif(not fashion_test_images_installed(), reason="Fashion-MNIST not installed")


@needs_fashion
def test_eval_image_writes_the_text_schema_with_bits_that_match_a_direct_computation(tmp_path):
    from quickmerge.ar.data import image_pixels
    from quickmerge.ar.model import load_ar_model

    pixels = image_pixels("test")[:3]
    _save(tmp_path / "m", IMAGE, pixels)
    out = tmp_path / "res"
    assert main(["eval", "image", "--model", str(tmp_path / "m"), "--examples", "3", "--ratios", "0.5",
                 "--methods", "quickmerge", "quickmerge-columns", "random", "--out", str(out), "--threads", "1"]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").is_file()
    rows = {(r["method"], r["compression_ratio"]): r for r in results["summary"]}
    assert set(rows) == {("none", None), ("quickmerge", 0.5), ("quickmerge-columns", 0.5), ("random", 0.5)}
    for r in rows.values():
        for key in ("perplexity", "perplexity_ci95", "ratio_to_uncompressed", "ratio_to_uncompressed_ci95",
                    "bits_per_token"):
            assert key in r
    assert rows[("random", 0.5)]["memory_saved"] == pytest.approx(0.5, abs=1 / IMAGE.context)
    assert rows[("quickmerge-columns", 0.5)]["memory_saved"] == pytest.approx(0.5, abs=1 / IMAGE.context)
    # Uncompressed bits per token = the model's own loss on the bottom rows, computed directly.
    model, book, fmt = load_ar_model(tmp_path / "m")
    ids = to_sequences(pixels, fmt, book)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, fmt.context:-1].reshape(-1, fmt.vocab_size),
                                            ids[:, fmt.context + 1:].reshape(-1), reduction="none")
    direct = nll.view(3, -1).mean(1).mean() / math.log(2)
    assert rows[("none", None)]["bits_per_token"] == pytest.approx(float(direct), rel=1e-4)


def test_eval_video_refuses_a_missing_clip_before_loading_anything(tmp_path, refused):
    refused(["eval", "video", "--video", str(tmp_path / "none.avi"), "--model", str(tmp_path)], "--video")


def test_a_directory_without_a_model_says_what_it_lacks(tmp_path):
    from quickmerge.pretrained.ar_models import load_ar

    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_ar(tmp_path)


@needs_fashion
def test_visualize_image_ar_draws_truth_and_every_method(tmp_path):
    from quickmerge.ar.data import image_pixels
    from quickmerge.eval.completions import best_kvpress

    _save(tmp_path / "m", IMAGE, image_pixels("test")[:3])
    out = tmp_path / "c.png"
    assert main(["visualize", "image-ar", "--model", str(tmp_path / "m"), "--examples", "2", "--ratios", "0.5",
                 "--results", str(tmp_path / "none.json"), "--out", str(out)]) == 0
    assert out.stat().st_size > 5_000
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"summary": [
        {"method": "kvpress-snapkv", "compression_ratio": 0.5, "ratio_to_uncompressed": 1.2},
        {"method": "kvpress-tova", "compression_ratio": 0.5, "ratio_to_uncompressed": 1.1},
        {"method": "quickmerge", "compression_ratio": 0.5, "ratio_to_uncompressed": 1.0}]}))
    assert best_kvpress(results, 0.5, "x") == "kvpress-tova"
    assert best_kvpress(results, 0.75, "x") == "x"


def test_visualize_refuses_an_unknown_method_before_loading_anything(tmp_path, refused):
    refused(["visualize", "image-ar", "--model", str(tmp_path), "--method", "kvpress-snapkv"],
            r"--method must be one of .*quickmerge-replay-row")


def test_greedy_generation_under_no_compression_equals_the_argmax_loop(tmp_path):
    from quickmerge.eval.text import NO_COMPRESSION, TextExample, generate_continuation

    fmt = SequenceFormat("image", 4, 8, patch=1, codes=4, frames=1, context_frames=0, context_rows=2)
    torch.manual_seed(0)
    model = build_ar_model(fmt, **TINY).eval()
    ids = torch.randint(0, 4, (fmt.length,))
    out = generate_continuation(model, TextExample("x", ids), fmt.context, 6, None, NO_COMPRESSION)
    seq = ids[: fmt.context + 1].tolist()
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.tolist() == seq[fmt.context + 1 :]


def test_eval_video_on_a_clip_runs_the_video_methods_at_their_ratio(tmp_path, refused):
    pytest.importorskip("cv2")
    require_usable_kvpress()
    from quickmerge.ar.formats import VIDEO

    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (9, 64, 64), generator=gen, dtype=torch.uint8)
    frames[1:] = frames[:1]  # a still scene: every frame repeats the first
    write_clip(tmp_path / "c.avi", frames)
    fmt = SequenceFormat(**{**VIDEO.to_dict(), "codes": 16})
    _save(tmp_path / "m", fmt, frames)
    out = tmp_path / "res"
    assert main(["eval", "video", "--model", str(tmp_path / "m"), "--video", str(tmp_path / "c.avi"),
                 "--examples", "2", "--ratios", "0.5", "--methods", "quickmerge-time", "quickmerge-input-time",
                 "kvpress-snapkv", "--out", str(out), "--threads", "1"]) == 0
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["summary"]}
    assert set(rows) == {"none", "quickmerge-time", "quickmerge-input-time", "kvpress-snapkv"}
    for name in ("quickmerge-time", "quickmerge-input-time", "kvpress-snapkv"):
        assert rows[name]["achieved_ratio"] == pytest.approx(0.5, abs=2 / fmt.context), name
        assert math.isfinite(rows[name]["bits_per_token"])
    refused(["eval", "video", "--model", str(tmp_path / "m"), "--video", str(tmp_path / "c.avi"),
            "--examples", "3", "--out", str(out), "--fresh", "--methods", "random"],
            r"^quickmerge eval video: error: .*windows")
    # without --examples, a clip gives every window it holds (2 here), not the held-out default of 40
    assert main(["eval", "video", "--model", str(tmp_path / "m"), "--video", str(tmp_path / "c.avi"),
                 "--ratios", "0.5", "--out", str(out), "--fresh", "--methods", "random", "--threads", "1"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["config"]["examples"] == 2 and torch.__version__.startswith(result["config"]["versions"]["torch"])
    assert all(len(row["nll_per_example"]) == 2 for row in result["summary"])
    write_clip(tmp_path / "short.avi", frames[:5])  # one window of 4 frames
    refused(["eval", "video", "--model", str(tmp_path / "m"), "--video", str(tmp_path / "short.avi"),
            "--out", str(out), "--fresh", "--methods", "random"], r"holds 1 window\(s\) of 4 frames")


@needs_fashion
def test_more_examples_than_the_data_holds_is_one_line(tmp_path, refused):
    """Asking for more test images than exist was a ValueError traceback; it is refused in one line."""
    from quickmerge.ar.data import image_pixels

    _save(tmp_path / "m", IMAGE, image_pixels("test")[:3])
    refused(["eval", "image", "--model", str(tmp_path / "m"), "--examples", "20000", "--ratios", "0.5",
            "--methods", "random", "--out", str(tmp_path / "res"), "--threads", "1"],
            "^quickmerge eval image: error: --examples must be between 1 and 10000")
    assert not (tmp_path / "res.json").exists()
