"""Pooling the video classifier's evaluations over training seeds: per-clip differences averaged over the models."""

import argparse
import json

import pytest

from benchmarks.video_vit_fashion import DEFAULT_QUERIES, default_rows, hits_key, parse_variant, pool


def eval_run(hits: dict[str, str], clip_seed: int = 0, model: str = "seed0") -> dict:
    rows = [{"method": "none", "r": 0}] + [{"method": m, "r": 32} for m in ("tome", "quickmerge")]
    return {"args": {"clip_seed": clip_seed, "model": model}, "clips": len(hits["none@0"]), "rows": rows,
            "hits": hits}


def run_pool(tmp_path, runs: list[dict], png: str | None = None) -> dict:
    paths = []
    for i, run in enumerate(runs):
        paths.append(tmp_path / f"eval{i}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "pooled.json"
    pool(argparse.Namespace(evals=[str(p) for p in paths], json=str(out), png=png))
    return json.loads(out.read_text())


def test_pool_averages_each_clips_difference_over_the_models(tmp_path):
    first = eval_run({"none@0": "1111", "tome@32": "1100", "quickmerge@32": "1110"})   # QuickMerge++ +1 clip
    second = eval_run({"none@0": "1110", "tome@32": "1110", "quickmerge@32": "1010"}, model="seed1")  # -1 clip
    pooled = run_pool(tmp_path, [first, second])
    row = pooled["rows"][0]
    assert row["r"] == 32 and row["models"] == 2
    assert row["tome_top1"] == pytest.approx(100 * (2 / 4 + 3 / 4) / 2)
    assert row["quickmerge_top1"] == pytest.approx(100 * (3 / 4 + 2 / 4) / 2)
    # per clip, averaged over the two models: 0, -0.5, +0.5, 0 -> mean 0
    assert row["quickmerge_minus_tome"][0] == pytest.approx(0.0)
    assert row["tome_minus_unpatched"][0] == pytest.approx(100 * ((-2 / 4) + 0) / 2)
    assert pooled["unpatched_top1"] == pytest.approx(100 * (1 + 3 / 4) / 2)
    assert row["quickmerge_minus_tome_per_model"] == pytest.approx([25.0, -25.0])  # each model alone
    alone = run_pool(tmp_path, [first])["rows"][0]
    assert alone["quickmerge_minus_tome"][0] == pytest.approx(25.0)


def test_pool_puts_the_clip_sets_of_the_same_models_one_after_another(tmp_path):
    a0 = eval_run({"none@0": "11", "tome@32": "10", "quickmerge@32": "11"}, model="a")  # +1 of 2 clips
    b0 = eval_run({"none@0": "11", "tome@32": "11", "quickmerge@32": "11"}, model="b")  # level
    a1 = eval_run({"none@0": "1111", "tome@32": "1111", "quickmerge@32": "0111"}, clip_seed=1, model="a")  # -1 of 4
    b1 = eval_run({"none@0": "1111", "tome@32": "0011", "quickmerge@32": "1111"}, clip_seed=1, model="b")  # +2 of 4
    pooled = run_pool(tmp_path, [b1, a0, b0, a1])
    row = pooled["rows"][0]
    assert pooled["clips"] == 6 and row["models"] == 2 and row["clip_sets"] == 2
    # per clip, averaged over a and b: set 0 (+0.5, 0), set 1 (0, +0.5, 0, 0) -> mean 1/6
    assert row["quickmerge_minus_tome"][0] == pytest.approx(100 / 6)
    assert row["quickmerge_minus_tome_per_model"] == pytest.approx([0.0, 100 * 2 / 6])  # a: +1 -1, b: +2 of 6


@pytest.mark.parametrize("case", ["a model missing from a clip set", "one model twice"])
def test_pool_refuses_clip_sets_not_scored_by_the_same_models(tmp_path, case):
    hits = {"none@0": "11", "tome@32": "10", "quickmerge@32": "11"}
    runs = ([eval_run(hits, model="a"), eval_run(hits, model="b"), eval_run(hits, clip_seed=1, model="a")]
            if case == "a model missing from a clip set" else [eval_run(hits, model="a"), eval_run(hits, model="a")])
    with pytest.raises(SystemExit, match="same models"):
        run_pool(tmp_path, runs)


def test_pool_refuses_a_plot_of_untimed_evaluations_before_any_work(tmp_path):
    untimed = eval_run({"none@0": "11", "tome@32": "10", "quickmerge@32": "11"})
    with pytest.raises(SystemExit, match="--rounds > 0"):
        run_pool(tmp_path, [untimed, untimed], png=str(tmp_path / "plot.png"))
    assert not (tmp_path / "pooled.json").exists() and not (tmp_path / "plot.png").exists()


def test_pool_refuses_a_plot_of_several_clip_sets(tmp_path):
    hits = {"none@0": "11", "tome@32": "10", "quickmerge@32": "11"}
    runs = [eval_run(hits, clip_seed=seed) for seed in (0, 1)]
    for run in runs:
        for row in run["rows"]:
            row["speedup"] = 1.0
    with pytest.raises(SystemExit, match="one clip set"):
        run_pool(tmp_path, runs, png=str(tmp_path / "plot.png"))
    assert not (tmp_path / "plot.png").exists()


def test_pool_compares_other_saliency_query_counts_with_tome_and_the_default_count(tmp_path):
    a = eval_run({"none@0": "1111", "tome@32": "1100", "quickmerge@32": "1110", "quickmerge@32/queries=8": "1111",
                  "quickmerge@32/queries=4": "0000"}, model="a")
    b = eval_run({"none@0": "1111", "tome@32": "1111", "quickmerge@32": "1111", "quickmerge@32/queries=8": "1101"},
                 model="b")
    pooled = run_pool(tmp_path, [a, b])
    assert pooled["rows"][0]["quickmerge_minus_tome"][0] == pytest.approx(100 * (1 / 4 + 0) / 2)  # the default rows
    (row,) = pooled["variant_rows"]  # 4 queries: model a only, so not pooled
    assert (row["r"], row["variant"], row["saliency_queries"], row["models"]) == (32, "queries=8", 8, 2)
    assert row["top1"] == pytest.approx(100 * (4 / 4 + 3 / 4) / 2)
    assert row["minus_tome_per_model"] == pytest.approx([50.0, -25.0])
    assert row["minus_tome"][0] == pytest.approx(100 * (2 / 4 - 1 / 4) / 2)
    assert row["minus_default_options_per_model"] == pytest.approx([25.0, -25.0])
    # per clip, averaged over the models: a (0, 0, 0, +1), b (0, 0, -1, 0) -> 0, 0, -0.5, +0.5
    assert row["minus_default_options"][0] == pytest.approx(0.0)
    assert row["minus_default_options"][1] < 0 < row["minus_default_options"][2]


def test_hits_keys_keep_the_plain_name_at_the_defaults_and_name_each_other_option():
    assert hits_key("quickmerge", 32) == hits_key("quickmerge", 32, {"saliency_queries": DEFAULT_QUERIES}) \
        == hits_key("quickmerge", 32, {"saliency": "cls"}) == "quickmerge@32"
    assert hits_key("quickmerge", 24, {"saliency_queries": 8}) == "quickmerge@24/queries=8"
    assert hits_key("quickmerge", 24, {"saliency": "mean", "saliency_queries": 4}) == \
        "quickmerge@24/saliency=mean/queries=4"
    assert parse_variant("/saliency=mean/queries=4") == {"saliency": "mean", "saliency_queries": 4}
    rows = [{"method": "none", "r": 0}, {"method": "tome", "r": 32},
            {"method": "quickmerge", "r": 32, "saliency_queries": DEFAULT_QUERIES},
            {"method": "quickmerge", "r": 32, "saliency_queries": 8}, {"method": "quickmerge", "r": 32,
                                                                        "saliency": "mean"}]
    assert default_rows(rows) == rows[:3]


def test_eval_scores_kl_per_clip_and_gives_quickmerge_its_options_explicitly(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from quickmerge.data import fashion_mnist

    if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    import torch

    import quickmerge
    from benchmarks import video_vit_fashion as vvf
    from quickmerge.data.fashion_mnist import load_fashion_mnist

    torch.manual_seed(0)
    transformers.VideoMAEForVideoClassification(vvf.config()).eval().save_pretrained(tmp_path / "model")
    out = tmp_path / "eval.json"
    seen = []
    real_patch = quickmerge.patch
    monkeypatch.setattr(quickmerge, "patch", lambda model, **kw: seen.append(kw) or real_patch(model, **kw))
    vvf.evaluate(argparse.Namespace(model=str(tmp_path / "model"), r=[32], count=6, batch=4, rounds=0, clip_seed=0,
                                    saliency_queries=[DEFAULT_QUERIES], saliency_mean=False, hidden_scaled=True,
                                    threads=1, json=str(out), png=None))
    result = json.loads(out.read_text())
    rows = {vvf.hits_key(row["method"], row["r"], vvf.row_options(row)): row for row in result["rows"]}
    assert set(rows) == {"none@0", "tome@32", "quickmerge@32", "quickmerge@32/similarity=hidden/saliency_rule=scaled"}
    # the plain row names every QuickMerge++ option, so it stays stop 67-71's QuickMerge++ whatever patch defaults to
    assert seen[1] == {"r": 32, "method": "quickmerge", "saliency": "cls", "saliency_queries": DEFAULT_QUERIES,
                       "similarity": "keys", "saliency_rule": "additive"}
    assert seen[0] == {"r": 32, "method": "tome"}
    assert seen[2]["similarity"] == "hidden" and seen[2]["saliency_rule"] == "scaled"
    assert rows["none@0"]["kl_millinats"][0] == 0.0
    model = transformers.VideoMAEForVideoClassification.from_pretrained(tmp_path / "model").eval()
    items, labels = load_fashion_mnist("test")
    x, _ = vvf.clips(items, labels, 6, seed=0)
    with torch.inference_mode():
        base = model(pixel_values=x).logits.double().log_softmax(-1)
        for key, options in (("quickmerge@32", {"similarity": "keys", "saliency_rule": "additive"}),
                             ("quickmerge@32/similarity=hidden/saliency_rule=scaled", vvf.CHOSEN_MATCHING)):
            with real_patch(model, r=32, **options):
                merged = model(pixel_values=x).logits.double().log_softmax(-1)
            kl = (base.exp() * (base - merged)).sum(-1).mean().item()
            assert rows[key]["kl_millinats"][0] == pytest.approx(1e3 * kl, rel=1e-4, abs=1e-6)
    hidden = rows["quickmerge@32/similarity=hidden/saliency_rule=scaled"]
    difference = hidden["kl_millinats"][0] - rows["quickmerge@32"]["kl_millinats"][0]
    assert hidden["kl_minus_default_options"][0] == pytest.approx(difference, abs=1e-6)
    assert hidden["kl_minus_tome"][0] == pytest.approx(hidden["kl_millinats"][0] - rows["tome@32"]["kl_millinats"][0],
                                                       abs=1e-6)
