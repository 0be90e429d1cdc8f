import numpy as np
import pytest
import torch

from quickmerge.vision.visualize import draw_groups

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_draw_groups_fills_means_and_outlines():
    image = np.zeros((4, 4, 3), dtype=np.float32)
    image[:, :2] = 0.2
    image[:, 2:] = 0.6
    image[0, 0] = 0.4
    groups = np.array([[0, 1], [0, 1]])  # left half one token, right half another
    out = draw_groups(image, groups)
    inner_left = out[1:, 0]  # not on an edge
    assert np.allclose(out[:, 0][~np.all(out[:, 0] == 1.0, axis=-1)], (0.4 + 7 * 0.2) / 8)
    assert inner_left.shape == (3, 3)
    assert np.all(out[:, 2] == 1.0)  # the boundary between the two tokens is drawn
    assert np.allclose(out[:, 3], 0.6)


def test_dropped_patches_are_black():
    image = np.ones((4, 4, 3), dtype=np.float32) * 0.5
    out = draw_groups(image, np.array([[0, -1], [0, 0]]))
    assert np.all(out[:2, 3] == 0.0)  # inside the dropped patch
    assert np.all(out[:2, 2] == 1.0)  # its outline


@pytest.fixture(scope="module")
def shipped_vit():
    pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    from quickmerge.pretrained.fashion_vit import load_fashion_vit

    return load_fashion_vit()


def _drawn_settings(monkeypatch, model, **kwargs) -> dict[str, dict]:
    """Run ``visualize`` on a blank image and a square; what each column was merged with, and its groups."""
    pytest.importorskip("matplotlib")
    from quickmerge.vision import visualize as module

    seen = {}
    real = module.source_groups

    def recording(model, images, grid, **cfg):
        groups, logits = real(model, images, grid, **cfg)
        seen[cfg["method"]] = {**cfg, "groups": groups}
        return groups, logits

    monkeypatch.setattr(module, "source_groups", recording)
    images = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    images[1, :, 8:20, 8:20] = 200
    module.visualize(model, images, torch.tensor([0, 1]), kwargs.pop("path"), **kwargs)
    return seen


def test_visualize_draws_greedy_matching_past_tomes_cap_and_says_where_tome_stops(monkeypatch, tmp_path,
                                                                                   shipped_vit):
    path = tmp_path / "groups.png"
    seen = _drawn_settings(monkeypatch, shipped_vit, path=str(path), r=120,
                           options={"matching": "greedy", "similarity": "hidden"})
    assert path.stat().st_size > 0
    assert seen["quickmerge"]["r"] == [120, 68, 0, 0, 0, 0] and seen["quickmerge"]["similarity"] == "hidden"
    assert seen["tome"]["r"] == 98  # its most; the column's title says so
    tokens = {m: [len(np.unique(g[g >= 0])) for g in s["groups"]] for m, s in seen.items()}
    assert tokens["quickmerge"] == [8, 8]  # down to the floor, past what ToMe-style reaches in these 6 blocks
    assert tokens["tome"] == [4, 4]  # 196 -> 98 -> 49 -> 25 -> 13 -> 7 -> 4


def test_visualize_keep_order_draws_the_merges_of_patch_ordered_tokens(monkeypatch, tmp_path, shipped_vit):
    from quickmerge.vision.visualize import source_groups

    images = torch.randn(4, 1, 28, 28)
    for method in ("quickmerge", "tome"):
        ordered, _ = source_groups(shipped_vit, images, 14, method=method, r=40, keep_order=True)
        default, _ = source_groups(shipped_vit, images, 14, method=method, r=40)
        assert not np.array_equal(ordered, default)  # later blocks match other alternate sets
    seen = _drawn_settings(monkeypatch, shipped_vit, path=str(tmp_path / "groups.png"), r=40, keep_order=True)
    assert seen["quickmerge"]["keep_order"] and seen["tome"]["keep_order"]
    assert not any(_drawn_settings(monkeypatch, shipped_vit, path=str(tmp_path / "g.png"), r=40)[m]["keep_order"]
                   for m in ("quickmerge", "tome"))


def test_visualize_refuses_an_r_its_matching_would_cap(tmp_path, shipped_vit):
    from quickmerge.vision.visualize import visualize

    images = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="r must be at most 98 with bipartite matching"):
        visualize(shipped_vit, images, torch.tensor([0]), str(tmp_path / "x.png"), r=120)
    with pytest.raises(ValueError, match="r must be at most 188 with greedy matching"):
        visualize(shipped_vit, images, torch.tensor([0]), str(tmp_path / "x.png"), r=189,
                  options={"matching": "greedy"})


def test_visualize_draws_each_image_at_its_own_budget(monkeypatch, tmp_path, shipped_vit):
    from quickmerge.vision.image_budget import ImageBudget

    # the blank image (1 content patch) in the first bucket, the square (36 patches) in the second
    budget = ImageBudget(thresholds=[10.0], r=[60, 10], patch_size=2)
    seen = _drawn_settings(monkeypatch, shipped_vit, path=str(tmp_path / "groups.png"), r=24, image_budget=budget)
    tokens = [len(np.unique(g[g >= 0])) for g in seen["quickmerge"]["groups"]]
    assert tokens == [5, 136]  # 196 -> 136 -> 76 -> 38 -> 19 -> 10 -> 5 (half at most); 196 - 6 x 10
    assert seen["tome"]["r"] == 24 and seen["quickmerge"]["image_budget"] is budget
    with pytest.raises(ValueError, match="not both"):
        _drawn_settings(monkeypatch, shipped_vit, path=str(tmp_path / "x.png"), image_budget=budget,
                        schedule=[24] * 6)


def test_visualize_cli_draws_the_entropy_schedule_eval_vision_calibrates(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("safetensors")
    from quickmerge.cli import main
    from quickmerge.vision import visualize as module
    from quickmerge.vision.budget import entropy_schedule

    drawn, perplexity = {}, [30.0, 160.0, 100.0, 120.0, 110.0, 90.0]
    monkeypatch.setattr(module, "visualize", lambda *args, **kwargs: drawn.update(kwargs) or "drawn.png")
    monkeypatch.setattr("quickmerge.eval.vision_cli.calibrate", lambda model: perplexity)
    assert main(["visualize", "--schedule", "entropy", "--r", "32", "--no-photos", "--out", str(tmp_path)]) == 0
    assert drawn["schedule"] == entropy_schedule(perplexity, 196, 32)
    assert drawn["r"] == 32 and drawn["options"] == {"matching": "bipartite"}
    assert drawn["keep_order"] is False
    assert main(["visualize", "--keep-order", "--no-photos", "--out", str(tmp_path)]) == 0
    assert drawn["keep_order"] is True
