"""``quickmerge eval decoding`` on the AR image and video models (tiny random ones, saved as the trained ones are):
each model's defaults, what it scores, a clip given with ``--video``, what it refuses."""

import argparse
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from quickmerge.ar.formats import IMAGE, VIDEO, SequenceFormat, to_sequences
from quickmerge.cli import main
from tests.conftest import write_clip
from tests.eval.conftest import fashion_test_images_installed, save_tiny_ar

needs_fashion = pytest.mark.skipif(not fashion_test_images_installed(), reason="Fashion-MNIST not installed")


def _arguments(model: str, **given) -> argparse.Namespace:
    from quickmerge.eval.decoding_cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", model] + [a for k, v in given.items() for a in (f"--{k}", *map(str, v))]
    return parser.parse_args(argv)


def test_the_defaults_follow_the_model_and_flags_given_stay():
    from quickmerge.eval.decoding_cli import check_arguments

    expected = {"video": (40, 257, 767, [385], 64),  # BOS + the first frame; the rest; BOS + 1.5 frames; 1/4 frame
                "image": (40, 113, 671, [197], 28),  # BOS + 4 rows; the rest; BOS + 7 rows; one row
                "smollm2-135m": (32, 128, 640, [192], 64)}
    for model, values in expected.items():
        args = _arguments(model)
        budgets = check_arguments(args)
        assert (args.examples, args.prompt, args.continuation, args.sizes, args.interval) == values, model
        assert [b.size for b in budgets] == values[3]
    for fmt in (IMAGE, VIDEO):  # the default window is the whole sequence: P + C + 1 tokens
        args = _arguments(fmt.name)
        check_arguments(args)
        assert args.prompt + args.continuation + 1 == fmt.length
    args = _arguments("video", sizes=[321, 513], examples=[8])
    check_arguments(args)
    assert (args.examples, args.prompt, args.sizes, args.interval) == (8, 257, [321, 513], 64)


def test_what_cannot_run_is_refused_before_a_model_loads(tmp_path, refused):
    base = ["eval", "decoding", "--out", str(tmp_path / "r")]
    refused([*base, "--model", "video", "--continuation", "768"], r"--prompt \+ --continuation \(257 \+ 768\) "
            r"must be at most 1024")
    refused([*base, "--model", "image", "--sizes", "150"], r"size - prompt \(150 - 113\) must be a multiple")
    refused([*base, "--model", "image", "--video", str(tmp_path / "c.avi")], r"^quickmerge eval decoding: error: "
            r"--video: needs a video model")
    refused([*base, "--model", "video", "--video", str(tmp_path / "none.avi")], r"--video: no file at")
    assert not (tmp_path / "r.journal").exists()


def test_a_shipped_model_that_is_not_there_says_how_to_train_it_before_a_journal_is_written(tmp_path, monkeypatch,
                                                                                          refused):
    import quickmerge.pretrained.ar_models as ar_models

    monkeypatch.setattr(ar_models, "ASSET_DIR", tmp_path / "assets")
    refused(["eval", "decoding", "--model", "video", "--out", str(tmp_path / "r")],
            r"no shipped video model in .*assets/ar_video; train one with `quickmerge train ar-video")
    assert not (tmp_path / "r.journal").exists()


def _image_run(tmp_path, *extra: str) -> dict:
    """A tiny image model on 3 test images at the image defaults (prompt 113, interval 28) with a shorter
    continuation (the first 113 + 120 + 1 tokens), S = 141, QuickMergePress; the results."""
    from quickmerge.ar.data import image_pixels

    save_tiny_ar(tmp_path / "m", IMAGE, image_pixels("test")[:3])
    out = tmp_path / "run"
    assert main(["eval", "decoding", "--model", str(tmp_path / "m"), "--examples", "3", "--batch", "3",
                 "--continuation", "120", "--sizes", "141", "--methods", "quickmerge", "--threads", "1", *extra,
                 "--out", str(out)]) == 0
    return json.loads(out.with_suffix(".json").read_text())


@needs_fashion
def test_an_image_model_scores_the_test_images_from_the_first_compressed_prediction(tmp_path):
    from quickmerge.ar.data import image_pixels
    from quickmerge.ar.model import load_ar_model
    from quickmerge.eval.decoding import DecodingBudget

    results = _image_run(tmp_path)
    assert results["format"] == IMAGE.to_dict() and results["config"]["prompt"] == 113
    rows = {r["method"]: r for r in results["summary"]}
    first = DecodingBudget(113, 141, 28).first_scored
    assert first == 57 and rows["none"]["scored_from_token"] == first
    model, book, fmt = load_ar_model(tmp_path / "m")
    ids = to_sequences(image_pixels("test")[:3], fmt, book)[:, : 113 + 120 + 1]
    with torch.no_grad():  # one teacher-forced pass over the test images' tokens
        logits = model(input_ids=ids).logits[:, 112:-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 113:], reduction="none")
    assert rows["none"]["nll_per_example"] == pytest.approx(nll[:, first:].mean(dim=1).tolist(), abs=1e-5)
    assert rows["none"]["bits_per_token"] == pytest.approx(float(nll[:, first:].mean()) / math.log(2), abs=1e-5)
    assert rows["quickmerge"]["mean_cache_entries"] < rows["none"]["mean_cache_entries"]
    assert rows["quickmerge"]["nll_per_example"] != pytest.approx(rows["none"]["nll_per_example"], abs=1e-6)


def test_a_clip_gives_every_window_and_a_video_model_s_budget(tmp_path, refused):
    pytest.importorskip("cv2")
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (12, 64, 64), generator=gen, dtype=torch.uint8)
    write_clip(tmp_path / "c.avi", frames)
    fmt = SequenceFormat(**{**VIDEO.to_dict(), "codes": 16})
    save_tiny_ar(tmp_path / "m", fmt, frames)
    out = tmp_path / "run"
    # 12 frames: 3 windows of 4; the video defaults (prompt 257, interval 64), 200 tokens decoded
    assert main(["eval", "decoding", "--model", str(tmp_path / "m"), "--video", str(tmp_path / "c.avi"),
                 "--continuation", "200", "--sizes", "321", "--methods", "quickmerge", "--threads", "1",
                 "--out", str(out)]) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["config"]["examples"] == 3 and results["config"]["video"].endswith("c.avi")
    rows = {r["method"]: r for r in results["summary"]}
    assert all(len(r["nll_per_example"]) == 3 for r in rows.values())
    assert rows["quickmerge"]["mean_cache_entries"] < rows["none"]["mean_cache_entries"]
    assert all(math.isfinite(v) for r in rows.values() for v in r["nll_per_example"])
    refused(["eval", "decoding", "--model", str(tmp_path / "m"), "--video", str(tmp_path / "c.avi"), "--first", "2",
             "--continuation", "200", "--sizes", "321", "--methods", "quickmerge", "--out", str(tmp_path / "r2")],
            r"holds 3 window\(s\) of 4 frames \(from --first 2\)")


@needs_fashion
def test_an_image_model_generates_from_the_top_rows_with_generate(tmp_path):
    from quickmerge.ar.data import image_pixels
    from quickmerge.ar.model import load_ar_model

    results = _image_run(tmp_path, "--generate")
    assert results["format"] == IMAGE.to_dict() and results["protocol"] == "generation"
    rows = {r["method"]: r for r in results["summary"]}
    assert rows["none"]["identical_to_the_end"] == 1.0 and "bits_per_token" not in rows["none"]
    assert rows["none"]["tokens_scored"] == 121 - 57
    model, book, fmt = load_ar_model(tmp_path / "m")
    prompts = to_sequences(image_pixels("test")[:3], fmt, book)[:, :113]
    journal = [json.loads(line) for line in (tmp_path / "run.journal" / "rank0.jsonl").read_text().splitlines()]
    none = [e["row"]["tokens"] for e in journal if e["key"].endswith("|none|None")]
    with torch.no_grad():  # transformers' greedy decoding of the same top rows
        expected = model.generate(prompts, max_new_tokens=121, min_new_tokens=121, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[:, 113:]
    assert none == expected.tolist()
    assert rows["quickmerge"]["mean_cache_entries"] < rows["none"]["mean_cache_entries"]
