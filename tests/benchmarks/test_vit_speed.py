"""benchmarks/vit_speed.py end to end on a small timm ViT: one row per setting, and the patched rows merged."""

import json
import sys

import pytest


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
    assert all(row["images_per_s"] > 0 and row["speedup"] > 0 for row in rows.values())
    # r = 48 in each of 12 blocks leaves a few tokens of 197: far less work than the unpatched model
    assert all(rows[m]["speedup"] > 1.5 for m in ("tome", "quickmerge", "quickmergekeys"))
