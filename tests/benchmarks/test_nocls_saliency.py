"""``benchmarks/nocls_saliency.py``: the saliency variants of a ViT without a class token, paired per image."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import child_env

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def test_every_variant_is_measured_on_the_same_images_and_the_default_row_is_patchs_default(tmp_path):
    pytest.importorskip("timm")
    from quickmerge.data import fashion_mnist

    if not (fashion_mnist.data_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks" / "exploration"))
    from vision_gap_pooling import gap_model

    from quickmerge.data.fashion_mnist import normalize
    from quickmerge.vision import patch
    from quickmerge.vision.train import split_train_heldout

    model = gap_model(class_token=False).eval()  # the reference's weights, head reset: untrained but real features
    weights, out = tmp_path / "gap.pt", tmp_path / "nocls.json"
    torch.save(model.state_dict(), weights)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nocls_saliency.py"), "--weights", str(weights),
                    "--images", "48", "--r", "24", "--threads", "1", "--out", str(out)], check=True, cwd=ROOT,
                   env=child_env(TQDM_DISABLE="1"))
    result = json.loads(out.read_text())
    rows = {row["setting"]: row for row in result["rows"]}
    assert set(rows) == {"tome", "queries=16", "queries=4", "queries=8", "mean", "hidden+scaled"}
    assert result["images"] == 48
    images, labels = split_train_heldout()[1]
    with torch.inference_mode():
        plain = model(normalize(images[:48])).argmax(-1)
        with patch(model, r=24, similarity="keys", saliency_rule="additive"):  # stop 71's defaults: 16 queries
            merged = model(normalize(images[:48])).argmax(-1)
    assert result["unpatched_top1"] == pytest.approx(100 * (plain == labels[:48]).double().mean().item(), abs=1e-3)
    assert rows["queries=16"]["top1"] == pytest.approx(100 * (merged == labels[:48]).double().mean().item(), abs=1e-3)
    assert rows["mean"]["kl_millinats"][0] != rows["queries=16"]["kl_millinats"][0]  # the settings reach patch
    pairs = {c["comparison"]: c for c in result["comparisons"]}
    difference = rows["mean"]["kl_millinats"][0] - rows["queries=4"]["kl_millinats"][0]
    assert pairs["mean minus queries=4"]["kl_millinats"][0] == pytest.approx(difference, abs=2e-3)
    assert {"queries=4 minus queries=16", "queries=16 minus tome"} <= set(pairs)
