"""``benchmarks/nocls_entropy.py``: the entropy schedule of a ViT without a class token against constant r."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import child_env

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def test_schedules_are_calibrated_on_the_held_out_images_and_compared_on_the_same_images(tmp_path):
    pytest.importorskip("timm")
    from quickmerge.data import fashion_mnist

    if not (fashion_mnist.data_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks" / "exploration"))
    from vision_gap_pooling import gap_model

    from quickmerge.data.fashion_mnist import normalize
    from quickmerge.vision import patch
    from quickmerge.vision.budget import block_attention_perplexity, entropy_schedule
    from quickmerge.vision.train import split_train_heldout

    model = gap_model(class_token=False).eval()
    weights, out = tmp_path / "gap.pt", tmp_path / "entropy.json"
    torch.save(model.state_dict(), weights)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nocls_entropy.py"), "--weights", str(weights),
                    "--images", "40", "--calibration-images", "64", "--bipartite-r", "24", "--greedy-r", "120",
                    "--threads", "1", "--timing-rounds", "1", "--out", str(out)],
                   check=True, cwd=ROOT, env=child_env(TQDM_DISABLE="1"))
    result = json.loads(out.read_text())
    rows = {(row["r"], row["matching"], row["setting"]): row for row in result["rows"]}
    assert set(rows) == {(24, "bipartite", "tome"), (24, "bipartite", "constant"), (24, "bipartite", "entropy"),
                         (120, "greedy", "constant"), (120, "greedy", "entropy")} and result["images"] == 40
    assert result["calibration_images"] == 64
    images, labels = split_train_heldout()[1]
    perplexity = block_attention_perplexity(model, normalize(images[:64]))
    assert result["block_perplexity"] == pytest.approx(perplexity, rel=1e-6)
    assert rows[24, "bipartite", "entropy"]["schedule"] == entropy_schedule(perplexity, 196, 24)
    # evaluated on the held-out images after the calibration's (64..), never those; stop 71's defaults
    with torch.inference_mode(), patch(model, r=24, similarity="keys", saliency_rule="additive"):
        hits = (model(normalize(images[64:104])).argmax(-1) == labels[64:104]).double().mean().item()
    assert rows[24, "bipartite", "constant"]["top1"] == pytest.approx(100 * hits, abs=1e-3)
    assert rows[120, "greedy", "entropy"]["mean_tokens_per_block"] <= rows[120, "greedy", "constant"][
        "mean_tokens_per_block"] + 0.5  # the same cost
    assert {c["r"] for c in result["comparisons"]} == {24, 120}
    assert result["timing"]["rounds"] == 1 and all(len(row["speedup_per_round"]) == 1 and row["speedup"] > 0
                                                   for row in result["rows"])


def test_a_calibration_as_large_as_the_held_out_split_is_refused_before_the_model_loads(tmp_path):
    from quickmerge.data import fashion_mnist

    if not (fashion_mnist.data_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nocls_entropy.py"), "--weights",
                             str(tmp_path / "absent.pt"), "--calibration-images", "5000", "--out", str(tmp_path / "o")],
                            cwd=ROOT, env=child_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--calibration-images: expected fewer than the 5000 held-out images, got 5000" in result.stderr
