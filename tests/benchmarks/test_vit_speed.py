"""benchmarks/vit_speed.py end to end on a small timm ViT: one row per setting, and the patched rows merged."""

import json
import sys

import pytest

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_every_setting_is_timed_against_the_unpatched_model(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    from benchmarks import vit_speed

    out = tmp_path / "speed.json"
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(sys, "argv", ["vit_speed.py", "--model", "vit_tiny_patch16_224", "--batch", "2",
                                      "--rounds", "1", "--r", "48", "--threads", "1", "--legacy-matching",
                                      "--json", str(out)])
    vit_speed.main()
    result = json.loads(out.read_text())
    assert result["tokens"] == 197
    rows = {row["method"] + row.get("similarity", ""): row for row in result["rows"]}
    assert set(rows) == {"none", "quickmerge", "quickmergekeys", "tome"} and rows["tome"]["r"] == 48
    assert rows["quickmergekeys"]["saliency_rule"] == "additive" and "similarity" not in rows["quickmerge"]
    assert all(row["images_per_s"] > 0 and row["speedup"] > 0 for row in rows.values())  # speed is not tested
    # r = 48 in each of 12 blocks, at most half a block's patch tokens (the class token stays): 197 tokens entering
    # the first block, then 149, 101, 53, 27, 14, 8, 5, 3, 2, 2, 2
    assert rows["none"]["mean_tokens_per_layer"] == 197
    assert all(rows[m]["mean_tokens_per_layer"] == pytest.approx(563 / 12) for m in ("tome", "quickmerge",
                                                                                       "quickmergekeys"))
