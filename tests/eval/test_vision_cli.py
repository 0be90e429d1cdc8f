"""``quickmerge eval vision``'s sweep: ToMe's cap by default, greedy schedules past it with ``--matching greedy``."""

import importlib
import json

import pytest
import torch

from quickmerge.eval.vision_cli import FLOOR, build_sweep, format_comparisons
from quickmerge.vision.budget import entropy_schedule, token_counts

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

PERPLEXITY = [40.0, 8.0, 20.0]


def test_bipartite_sweep_is_constant_r_and_capped_entropy_schedules():
    sweep = build_sweep(["quickmerge", "tome"], [16, 64], ["constant", "entropy"], PERPLEXITY, 196)
    assert sweep[:4] == [("quickmerge", 16, {}), ("quickmerge", 64, {}), ("tome", 16, {}), ("tome", 64, {})]
    for (_, schedule, settings), r in zip(sweep[4:], [16, 64], strict=True):
        assert settings == {"label": "quickmerge-entropy"} and schedule == entropy_schedule(PERPLEXITY, 196, r)
        assert all(2 * m <= n for m, n in zip(schedule, token_counts(196, schedule), strict=False))


def test_greedy_sweep_runs_every_schedule_but_tomes_down_to_the_floor_past_the_cap():
    budgets = {120: {"thresholds": [1.0], "r": [150, 90], "patch_size": 2, "schedules": [[150, 38, 0], [90, 90, 8]]}}
    sweep = build_sweep(["quickmerge", "tome", "random"], [40, 120], ["constant", "entropy", "per-image"], PERPLEXITY,
                        196, {40: {}, 120: budgets[120]}, matching="greedy", num_layers=3)
    rows = {(m, s.get("label", m), json.dumps(r)): s for m, r, s in sweep}
    assert ("tome", "tome", "40") in rows and ("tome", "tome", "120") in rows  # ToMe-style stays bipartite, int r
    assert rows[("quickmerge", "quickmerge", json.dumps([120, 68, 0]))] == {"matching": "greedy"}  # 196 -> 76 -> 8
    assert rows[("random", "random", json.dumps([120, 68, 0]))] == {}
    assert rows[("quickmerge", "quickmerge", json.dumps([40, 40, 40]))] == {"matching": "greedy"}
    entropy = entropy_schedule(PERPLEXITY, 196, 120, floor=FLOOR, bipartite=False)
    assert max(entropy) > 98 and rows[("quickmerge", "quickmerge-entropy", json.dumps(entropy))]["matching"] == "greedy"
    per_image = rows[("quickmerge", "quickmerge-per-image", "120")]
    assert per_image == {"label": "quickmerge-per-image", "matching": "greedy", "image_budget": budgets[120]}
    with pytest.raises(ValueError, match="number of blocks"):
        build_sweep(["quickmerge"], [40], matching="greedy")


def test_quickmerge_options_of_the_command_line_reach_every_quickmerge_row_and_no_other():
    budgets = {16: {"thresholds": [1.0], "r": [20, 12], "patch_size": 2}}
    from quickmerge.cli import build_parser
    from quickmerge.eval.vision_cli import quickmerge_options

    chosen = quickmerge_options(build_parser().parse_args(["eval", "vision", "--saliency-rule", "additive",
                                                           "--similarity", "keys", "--saliency-weight", "0"]))
    assert chosen == {"saliency_rule": "additive", "saliency_weight": 0.0, "similarity": "keys"}  # not the defaults
    assert quickmerge_options(build_parser().parse_args(["eval", "vision", "--saliency-rule", "scaled",
                                                         "--similarity", "hidden"])) == {}  # the defaults
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "vision", "--saliency-weight", "-1"])
    assert quickmerge_options(build_parser().parse_args(["eval", "vision"])) == {}  # defaults: rows keep their keys
    sweep = build_sweep(["quickmerge", "tome", "random"], [16], ["constant", "entropy", "per-image"], PERPLEXITY, 196,
                        budgets, quickmerge_options=chosen)
    labels = {s.get("label", m): s for m, _, s in sweep}
    assert labels["quickmerge"] == chosen and labels["tome"] == labels["random"] == {}
    for label in ("quickmerge-entropy", "quickmerge-per-image"):
        assert {k: labels[label][k] for k in chosen} == chosen
    assert build_sweep(["quickmerge"], [16])[0] == ("quickmerge", 16, {})  # the defaults: rows as before
    greedy = build_sweep(["quickmerge"], [40], matching="greedy", num_layers=3, quickmerge_options=chosen)
    assert greedy[0][2] == {"matching": "greedy", **chosen}  # the options run with greedy matching too


def test_keep_order_reaches_every_row_and_only_when_asked():
    from quickmerge.cli import build_parser

    budgets = {16: {"thresholds": [1.0], "r": [20, 12], "patch_size": 2}}
    args = build_parser().parse_args(["eval", "vision", "--keep-order"])
    assert args.keep_order and not build_parser().parse_args(["eval", "vision"]).keep_order
    plain = build_sweep(["quickmerge", "tome", "random", "pool"], [16], ["constant", "entropy", "per-image"],
                        PERPLEXITY, 196, budgets)
    ordered = build_sweep(["quickmerge", "tome", "random", "pool"], [16], ["constant", "entropy", "per-image"],
                          PERPLEXITY, 196, budgets, keep_order=True)
    assert len(ordered) == len(plain) == 6
    for (m, r, s), (m2, r2, s2) in zip(plain, ordered, strict=True):
        assert (m, r, {**s, "keep_order": True}) == (m2, r2, s2) and "keep_order" not in s


def test_greedy_eval_vision_runs_past_the_cap_end_to_end(tiny_vit_dir, tmp_path, monkeypatch):
    from quickmerge.cli import build_parser
    from quickmerge.data import fashion_mnist
    from quickmerge.eval import vision_cli

    if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(vision_cli, "CALIBRATION_IMAGES", 64)
    args = build_parser().parse_args(
        ["eval", "vision", "--checkpoint", str(tiny_vit_dir), "--images", "64", "--batch-size", "64", "--r-values",
         "120", "--methods", "quickmerge", "random", "--matching", "greedy", "--timing-rounds", "1", "--threads", "1",
         "--out", str(tmp_path / "greedy")])
    results = vision_cli.run(args)
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {"none", "quickmerge", "random", "quickmerge-entropy", "quickmerge-per-image"}
    assert rows["quickmerge"]["r"] == [120, 68, 0] and rows["quickmerge"]["mean_tokens_per_layer"] == pytest.approx(
        1 + (196 + 76 + 8) / 3)  # the class token and the patch tokens entering each block
    bipartite_fewest = 1 + (196 + 98 + 49) / 3  # what halving in every block leaves
    for method in ("quickmerge-entropy", "quickmerge-per-image"):
        assert rows[method]["settings"]["matching"] == "greedy"
        assert rows[method]["mean_tokens_per_layer"] < bipartite_fewest
    assert json.loads((tmp_path / "greedy.json").read_text())["config"]["matching"] == "greedy"


def test_a_checkpoint_with_a_learned_saliency_merges_with_it_in_quickmerge_rows_only(tiny_vit_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    import shutil

    import torch

    from quickmerge.cli import build_parser
    from quickmerge.data import fashion_mnist
    from quickmerge.errors import UsageError
    from quickmerge.eval import vision as vision_eval
    from quickmerge.eval import vision_cli
    from quickmerge.vision import TokenScorer

    if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    checkpoint = tmp_path / "finetuned"
    shutil.copytree(tiny_vit_dir, checkpoint)
    saved = TokenScorer(3, json.loads((checkpoint / "config.json").read_text())["model"]["embed_dim"])
    with torch.no_grad():
        saved.weight.normal_(generator=torch.Generator().manual_seed(0))
    saved.save(checkpoint)
    calls = []  # (method, scorer weights or None) of every patch the eval makes
    real_patch = vision_eval.patch

    def spy(model, r=0, *, method="quickmerge", scorer=None, **kw):
        calls.append((method, None if scorer is None else scorer.weight.detach().clone()))
        return real_patch(model, r, method=method, scorer=scorer, **kw)

    monkeypatch.setattr(vision_eval, "patch", spy)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    args = build_parser().parse_args(
        ["eval", "vision", "--checkpoint", str(checkpoint), "--images", "64", "--batch-size", "64", "--r-values", "8",
         "--methods", "quickmerge", "tome", "--schedules", "constant", "--timing-rounds", "1", "--threads", "1",
         "--out", str(tmp_path / "learned")])
    results = vision_cli.run(args)
    used = {method: weight for method, weight in calls if method in ("quickmerge", "tome")}
    assert torch.equal(used["quickmerge"], saved.weight) and used["tome"] is None
    assert results["config"]["learned_saliency"] is True
    assert "learned saliency" in capsys.readouterr().err
    TokenScorer(2, saved.dim).save(checkpoint)  # a scorer of another model: refused before any image is read
    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", lambda *a: pytest.fail("read the data first"))
    with pytest.raises(UsageError, match="scorer for 2 blocks"):
        vision_cli.run(args)


def test_a_checkpoint_fine_tuned_with_merging_is_announced_and_recorded(tiny_vit_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from quickmerge.cli import build_parser
    from quickmerge.data import fashion_mnist
    from quickmerge.eval import vision_cli

    if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    assert vision_cli.announce_fine_tuned_merging(None) is None  # the shipped reference: nothing to say
    assert vision_cli.announce_fine_tuned_merging(str(tiny_vit_dir)) is None  # a plain training run
    checkpoint = tmp_path / "finetuned"
    shutil.copytree(tiny_vit_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    unmerged = {"checkpoint": "x", "method": "quickmerge", "r": 0, "ratio": None}  # fine-tuned without merging
    (checkpoint / "config.json").write_text(json.dumps({**config, "finetune": unmerged}))
    assert vision_cli.announce_fine_tuned_merging(str(checkpoint)) is None
    assert capsys.readouterr().err == ""
    (checkpoint / "config.json").write_text(json.dumps({**config, "finetune": {**unmerged, "method": "tome", "r": 8}}))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    args = build_parser().parse_args(
        ["eval", "vision", "--checkpoint", str(checkpoint), "--images", "32", "--batch-size", "32", "--r-values", "8",
         "--methods", "tome", "--schedules", "constant", "--timing-rounds", "1", "--threads", "1",
         "--out", str(tmp_path / "tuned")])
    results = vision_cli.run(args)
    assert "fine-tuned merging with tome at r = 8 per block" in capsys.readouterr().err
    assert results["config"]["fine_tuned_merging"]["r"] == 8
    ratio = {**unmerged, "r": None, "ratio": 0.5}
    (checkpoint / "config.json").write_text(json.dumps({**config, "finetune": ratio}))
    # a QuickMerge++ fine-tune that names no matching (before stop 48) ran with the defaults of then
    legacy = {**ratio, "similarity": "keys", "saliency_rule": "additive"}
    assert vision_cli.announce_fine_tuned_merging(str(checkpoint)) == legacy
    assert "with quickmerge at ratio = 0.5, similarity = keys, saliency_rule = additive" in capsys.readouterr().err
    named = {**ratio, "similarity": "hidden", "saliency_rule": "scaled"}  # one that names today's defaults
    (checkpoint / "config.json").write_text(json.dumps({**config, "finetune": named}))
    assert vision_cli.announce_fine_tuned_merging(str(checkpoint)) == named
    assert "with quickmerge at ratio = 0.5 (its config.json)" in capsys.readouterr().err


def test_eval_vision_in_bfloat16_runs_every_schedule_in_that_dtype_and_keeps_most_answers(tiny_vit_dir, tmp_path,
                                                                                         monkeypatch):
    from quickmerge.cli import build_parser
    from quickmerge.data import fashion_mnist
    from quickmerge.eval import vision, vision_cli

    if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(vision_cli, "CALIBRATION_IMAGES", 64)
    seen = []
    forward = vision._Setting.forward
    monkeypatch.setattr(vision._Setting, "forward", lambda self, x: seen.append(x.dtype) or forward(self, x))

    def run(dtype):
        args = build_parser().parse_args(
            ["eval", "vision", "--checkpoint", str(tiny_vit_dir), "--images", "64", "--batch-size", "32",
             "--r-values", "16", "--methods", "quickmerge", "tome", "--timing-rounds", "1", "--threads", "1",
             "--dtype", dtype, "--out", str(tmp_path / dtype)])
        return {row["method"]: row for row in vision_cli.run(args)["rows"]}, vision_cli.journal_config(args)

    (full, full_config), (half, half_config) = run("float32"), run("bfloat16")
    assert set(seen) == {torch.float32, torch.bfloat16}
    assert set(half) == set(full) == {"none", "quickmerge", "tome", "quickmerge-entropy", "quickmerge-per-image"}
    for method, row in half.items():  # the budgets are calibrated in float32: the same tokens either way
        assert row["mean_tokens_per_layer"] == pytest.approx(full[method]["mean_tokens_per_layer"])
        assert abs(row["accuracy"] - full[method]["accuracy"]) <= 0.1
    assert half_config != full_config  # a run in one dtype never resumes into the other


def test_timing_defaults_to_together_with_more_rounds_than_paired():
    from quickmerge.cli import build_parser
    from quickmerge.eval.vision_cli import journal_config, timing_rounds

    parse = build_parser().parse_args
    assert parse(["eval", "vision"]).timing == "together" and timing_rounds(parse(["eval", "vision"])) == 15
    assert timing_rounds(parse(["eval", "vision", "--timing", "paired"])) == 5
    assert timing_rounds(parse(["eval", "vision", "--timing", "paired", "--timing-rounds", "3"])) == 3
    # rows timed one way are never resumed into a run timed the other
    assert journal_config(parse(["eval", "vision"])) != journal_config(parse(["eval", "vision", "--timing", "paired"]))
    with pytest.raises(SystemExit):
        parse(["eval", "vision", "--timing", "interleaved"])


def test_scaled_rule_with_a_learned_saliency_is_refused_before_any_work(tiny_vit_dir, tmp_path, monkeypatch):
    import shutil

    from quickmerge.cli import build_parser
    from quickmerge.data import fashion_mnist
    from quickmerge.errors import UsageError
    from quickmerge.eval import vision_cli
    from quickmerge.vision import TokenScorer

    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", lambda *a: pytest.fail("read the data first"))
    checkpoint = tmp_path / "learned"
    shutil.copytree(tiny_vit_dir, checkpoint)
    model = json.loads((checkpoint / "config.json").read_text())["model"]
    TokenScorer(model["depth"], model["embed_dim"]).save(checkpoint)  # fits the model: refused for the rule only
    args = build_parser().parse_args(["eval", "vision", "--saliency-rule", "scaled", "--checkpoint", str(checkpoint)])
    with pytest.raises(UsageError, match="additive rule"):
        vision_cli.run(args)


def test_saliency_flags_reach_quickmerge_rows_and_a_count_nothing_asks_is_refused(tiny_vit_dir, tmp_path,
                                                                                 monkeypatch):
    from quickmerge.cli import build_parser
    from quickmerge.data import fashion_mnist
    from quickmerge.errors import UsageError
    from quickmerge.eval import vision_cli
    from quickmerge.eval.vision_cli import load_for_merging, quickmerge_options

    parse = build_parser().parse_args
    assert quickmerge_options(parse(["eval", "vision", "--saliency", "mean"])) == {"saliency": "mean"}
    assert quickmerge_options(parse(["eval", "vision", "--saliency", "queries", "--saliency-queries", "4"])) == {
        "saliency": "queries", "saliency_queries": 4}
    for bad in ("0", "2.5"):
        with pytest.raises(SystemExit):
            parse(["eval", "vision", "--saliency-queries", bad])
    monkeypatch.setattr(fashion_mnist, "load_fashion_mnist", lambda *a: pytest.fail("read the data first"))
    # the class token's saliency and the mean query ask no spread queries: a count there would change nothing
    for flags in (["--saliency-queries", "8"], ["--saliency", "mean", "--saliency-queries", "8"]):
        args = parse(["eval", "vision", "--checkpoint", str(tiny_vit_dir), *flags])
        with pytest.raises(UsageError, match="--saliency-queries 8"):
            vision_cli.run(args)
    load_for_merging(parse(["eval", "vision", "--checkpoint", str(tiny_vit_dir), "--saliency", "queries",
                            "--saliency-queries", "8"]), [16], ["quickmerge"])
    # a model without a class token asks spread queries by default: the count applies
    no_cls = save_without_class_token(tiny_vit_dir, tmp_path / "no_cls")
    model, _, _ = load_for_merging(parse(["eval", "vision", "--checkpoint", str(no_cls), "--saliency-queries", "8"]),
                                   [16], ["quickmerge"])
    assert model.cls_token is None


def test_eval_vision_merges_with_the_saliency_of_its_flags(tiny_vit_dir, tmp_path, monkeypatch):
    from quickmerge.cli import build_parser
    from quickmerge.data import fashion_mnist
    from quickmerge.eval import vision_cli

    patch_module = importlib.import_module("quickmerge.vision.patch")  # the module, not the function it exports
    if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    asked = set()
    saliency = patch_module.attention_saliency

    def spy(q, k, scale, log_size, source="cls", num_queries=16, valid=None):
        asked.add((source, num_queries))
        return saliency(q, k, scale, log_size, source, num_queries, valid)

    monkeypatch.setattr(patch_module, "attention_saliency", spy)
    args = build_parser().parse_args(
        ["eval", "vision", "--checkpoint", str(tiny_vit_dir), "--images", "64", "--batch-size", "64", "--r-values",
         "16", "--methods", "quickmerge", "tome", "--schedules", "constant", "--saliency", "queries",
         "--saliency-queries", "4", "--timing-rounds", "1", "--threads", "1", "--out", str(tmp_path / "queries")])
    results = vision_cli.run(args)
    assert asked == {("queries", 4)}
    rows = {row["method"]: row for row in results["rows"]}
    assert rows["quickmerge"]["settings"] == {"saliency": "queries", "saliency_queries": 4}
    assert rows["tome"]["settings"] == {}
    assert json.loads((tmp_path / "queries.json").read_text())["config"]["saliency_queries"] == 4


def save_without_class_token(tiny_vit_dir, path):
    """A copy of the tiny checkpoint rebuilt as timm's SigLIP-gap ViTs are: no class token, average pooling."""
    import shutil

    st = pytest.importorskip("safetensors.torch")
    from quickmerge.pretrained.fashion_vit import build_vit

    shutil.copytree(tiny_vit_dir, path)
    config = {**json.loads((path / "config.json").read_text())["model"], "class_token": False, "global_pool": "avg",
              "fc_norm": False}
    torch.manual_seed(0)
    st.save_file(build_vit(config).state_dict(), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model": config}))
    return path


def test_eval_vision_runs_every_default_schedule_on_a_model_without_a_class_token(tiny_vit_dir, tmp_path,
                                                                                   monkeypatch):
    """The entropy schedule's calibration used to refuse such a model, so the default command failed on it."""
    from quickmerge.cli import build_parser
    from quickmerge.data import fashion_mnist
    from quickmerge.eval import vision_cli

    if not (fashion_mnist.data_dir() / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist absent")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setattr(vision_cli, "CALIBRATION_IMAGES", 64)
    no_cls = save_without_class_token(tiny_vit_dir, tmp_path / "no_cls")
    args = build_parser().parse_args(
        ["eval", "vision", "--checkpoint", str(no_cls), "--images", "64", "--batch-size", "64", "--r-values", "16",
         "--methods", "quickmerge", "tome", "--timing-rounds", "1", "--threads", "1", "--out", str(tmp_path / "gap")])
    results = vision_cli.run(args)
    rows = {row["method"]: row for row in results["rows"]}
    assert set(rows) == {"none", "quickmerge", "tome", "quickmerge-entropy", "quickmerge-per-image"}
    assert len(results["block_attention_perplexity"]) == 3 and all(
        1.0 <= p <= 196.0 + 1e-3 for p in results["block_attention_perplexity"])
    assert rows["none"]["mean_tokens_per_layer"] == 196  # no class token among the tokens
    for method in ("quickmerge", "quickmerge-entropy", "quickmerge-per-image"):
        assert rows[method]["mean_tokens_per_layer"] < 196


def test_the_comparisons_print_in_points_with_their_intervals_where_there_are_any():
    results = {
        "quickmerge_vs_tome": [
            {"r": 16, "speedup": 1.21, "difference": 0.0005, "low": -0.0004, "high": 0.0013},
            {"r": 98, "speedup": 2.97, "difference": None},  # beyond QuickMerge++'s fastest: left out
        ],
        "quickmerge_entropy_vs_constant": [{"r": 48, "speedup": 2.13, "difference": -0.002}],  # no hits: no interval
        "quickmerge_per_image_vs_tome": [],
    }
    assert format_comparisons(results).splitlines() == [
        "QuickMerge++ minus ToMe-style, at ToMe-style's speed-ups (top-1 points [paired 95% interval]):",
        "  1.21x (r = 16): +0.05 [-0.04, +0.13]",
        "the entropy schedule minus QuickMerge++'s constant r, at constant r's speed-ups (top-1 points [paired 95% "
        "interval]):",
        "  2.13x (r = 48): -0.20",
    ]
    assert format_comparisons({"quickmerge_vs_tome": [{"r": 98, "speedup": 2.97, "difference": None}]}) == ""
