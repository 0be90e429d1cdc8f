import itertools

import pytest
import torch

from quickmerge.eval.vision import (
    accuracy_at,
    compare_at_tome_speeds,
    evaluate_setting,
    method_label,
    pack_hits,
    paired_difference_at,
    run_vision_eval,
    unpack_hits,
)

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def test_accuracy_at_interpolates_within_the_measured_range():
    rows = [{"speedup": 1.0, "accuracy": 0.9}, {"speedup": 2.0, "accuracy": 0.7}, {"speedup": 1.5, "accuracy": 0.85}]
    assert accuracy_at(rows, 1.25) == pytest.approx(0.875)
    assert accuracy_at(rows, 1.75) == pytest.approx(0.775)
    assert accuracy_at(rows, 2.5) is None and accuracy_at(rows, 0.5) is None


def test_compare_at_tome_speeds():
    rows = [
        {"method": "tome", "r": 8, "speedup": 1.2, "accuracy": 0.80},
        {"method": "quickmerge", "r": 8, "speedup": 1.0, "accuracy": 0.86},
        {"method": "quickmerge", "r": 16, "speedup": 1.4, "accuracy": 0.82},
    ]
    (row,) = compare_at_tome_speeds(rows)
    assert row["quickmerge_accuracy"] == pytest.approx(0.84) and row["difference"] == pytest.approx(0.04)
    assert "low" not in row  # rows without per-image hits (results written before stop 83): no interval


def test_hits_pack_into_hex_and_back():
    for n in (1, 7, 8, 9, 20):
        hits = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
        text = pack_hits(hits)
        assert len(text) == 2 * ((n + 7) // 8) and torch.equal(unpack_hits(text, n), hits)
    assert pack_hits(torch.tensor([True, False, False, False, False, False, False, True, True])) == "8180"
    with pytest.raises(ValueError, match="cannot hold 17 images"):
        unpack_hits("ff00", 17)


def test_the_interpolated_hits_minus_the_reference_hits_with_an_interval():
    ours = [(2.0, torch.tensor([True, False, True, False])), (1.0, torch.tensor([True, True, False, False]))]
    reference = torch.tensor([True, True, True, False])
    out = paired_difference_at(ours, 1.5, reference, samples=500)  # halfway: 1, .5, .5, 0 against 1, 1, 1, 0
    assert out["difference"] == pytest.approx(-0.25)
    assert out["between_speedups"] == [1.0, 2.0] and out["weight"] == pytest.approx(0.5)
    assert -0.5 <= out["low"] <= out["difference"] <= out["high"] <= 0.0
    slow, fast = torch.tensor([True, True, True, False]), torch.zeros(4, dtype=torch.bool)
    quarter = paired_difference_at([(1.0, slow), (2.0, fast)], 1.25, torch.ones(4, dtype=torch.bool), samples=500)
    assert quarter["weight"] == pytest.approx(0.25)  # 3/4 of the slower setting's hits: .75, .75, .75, 0
    assert quarter["difference"] == pytest.approx((3 * (0.75 - 1) + (0 - 1)) / 4)
    assert paired_difference_at(ours, 2.5, reference) is None  # beyond the method's fastest setting
    assert paired_difference_at(ours, 0.9, reference) is None
    alone = paired_difference_at(ours[:1], 2.0, reference, samples=500)  # one setting exactly at the speed-up
    assert alone["difference"] == pytest.approx(-0.25)


def test_compare_at_tome_speeds_gives_the_paired_interval_of_rows_with_hits():
    def row(method, r, speedup, hits):
        hits = torch.tensor(hits, dtype=torch.bool)
        return {"method": method, "r": r, "speedup": speedup, "accuracy": hits.double().mean().item(),
                "images": len(hits), "hits": pack_hits(hits)}

    rows = [row("tome", 8, 1.2, [1, 1, 1, 1, 0, 0, 1, 0, 1, 1] * 3), row("quickmerge", 8, 1.0, [1] * 30),
            row("quickmerge", 16, 1.4, [1, 1, 1, 0, 1, 1, 1, 1, 1, 1] * 3)]
    (out,) = compare_at_tome_speeds(rows)
    assert out["difference"] == pytest.approx(0.95 - 0.7)  # the points' interpolation, as without hits
    assert out["low"] <= out["difference"] <= out["high"] and out["low"] > 0  # QuickMerge++ right where ToMe fails


def test_legend_names_greedy_rows_as_such():
    rows = [{"method": "quickmerge", "settings": {"matching": "greedy"}}, {"method": "tome", "settings": {}},
            {"method": "quickmerge-entropy", "settings": {"label": "quickmerge-entropy"}}, {"method": "none"}]
    assert method_label("quickmerge", rows) == "QuickMerge++, greedy matching"
    assert method_label("tome", rows) == "ToMe-style"
    assert method_label("quickmerge-entropy", rows) == "QuickMerge++, entropy schedule"
    rows.append({"method": "quickmerge-entropy", "settings": {"label": "quickmerge-entropy", "matching": "greedy"}})
    assert method_label("quickmerge-entropy", rows) == "QuickMerge++, entropy schedule, greedy past ToMe's cap"


def test_evaluate_setting_counts_correct_predictions_and_tokens():
    model = timm_vit.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=2,
                                       num_heads=2).eval()
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    from quickmerge.data.fashion_mnist import normalize

    labels = model(normalize(images)).argmax(-1)  # the unpatched model is right on every image
    labels[:5] = (labels[:5] + 1) % 10  # ... except these five
    rows = run_vision_eval(model, images, labels, [("tome", 10, {})], batch_size=8, timing_rounds=1)
    assert rows[0]["method"] == "none" and rows[0]["accuracy"] == pytest.approx(0.75)
    assert torch.equal(unpack_hits(rows[0]["hits"], 20), torch.arange(20) >= 5)  # which images, in order
    assert rows[0]["mean_tokens_per_layer"] == 50
    assert rows[1]["mean_tokens_per_layer"] == pytest.approx(45) and rows[1]["speedup"] > 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    row = evaluate_setting(model, model, images, labels, method="pool", r=20, batch_size=20, timing_rounds=1)
    assert row["r"] == 20 and 0.0 <= row["accuracy"] <= 1.0


def _readings():
    """Stand-in ``cpu_counters``: readings that alternate between two with 10 of 100 ticks stolen between them (a
    timing phase reads once before its rounds and once after)."""
    zero = dict.fromkeys(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), 0)
    readings = itertools.cycle([zero, {**zero, "user": 90, "steal": 10}])
    return lambda: next(readings)


def test_speedup_is_the_median_of_each_rounds_paired_ratio(monkeypatch):
    from quickmerge.eval import vision

    model = timm_vit.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=2,
                                       num_heads=2).eval()
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    # (merged, unmerged) per round; the machine runs at half speed in the last two rounds
    times = iter([1.0, 2.0, 1.0, 2.0, 2.0, 4.0, 3.0, 4.0])
    monkeypatch.setattr(vision, "_timed", lambda fn, device: next(times))
    row = evaluate_setting(model, model, images, torch.zeros(4, dtype=torch.long), method="tome", r=2, batch_size=4,
                           timing_rounds=4)
    assert row["speedup_per_round"] == [2.0, 2.0, 2.0, 4.0 / 3.0]
    assert row["speedup"] == 2.0
    assert row["seconds_per_round"] == [1.0, 1.0, 2.0, 3.0]
    assert row["unpatched_seconds_per_round"] == [2.0, 2.0, 4.0, 4.0]
    times = iter([1.0, 2.0, 3.0, 3.0, 3.0, 6.0])  # medians 3 and 3, ratios 2, 1, 2
    row = evaluate_setting(model, model, images, torch.zeros(4, dtype=torch.long), method="tome", r=2, batch_size=4,
                           timing_rounds=3)
    assert row["speedup"] == 2.0 and row["images_per_s"] == row["unpatched_images_per_s"] == 4 / 3.0
    monkeypatch.setattr(vision, "_timed", lambda fn, device: 1.0)
    monkeypatch.setattr(vision, "cpu_counters", _readings())
    row = evaluate_setting(model, model, images, torch.zeros(4, dtype=torch.long), method="tome", r=2, batch_size=4,
                           timing_rounds=1)
    assert row["timing_steal_share"] == 0.1  # the host's steal over the timing rounds
    monkeypatch.setattr(vision, "cpu_counters", lambda: None)  # no /proc/stat: no figure claimed
    row = evaluate_setting(model, model, images, torch.zeros(4, dtype=torch.long), method="tome", r=2, batch_size=4,
                           timing_rounds=1)
    assert "timing_steal_share" not in row


def test_together_timing_rotates_the_order_and_times_each_setting_right_before_the_unpatched_model(monkeypatch):
    from quickmerge.eval import vision

    model = timm_vit.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=2,
                                       num_heads=2).eval()
    events = []
    real_forward, real_reference = vision._Setting.forward, vision._Setting.reference

    def forward(self, x):
        events.append(("merged", self.handle.r if self.handle is not None else 0))
        return real_forward(self, x)

    def reference(self, batch, parts):
        events.append(("unpatched", None))
        return real_reference(self, batch, parts)

    monkeypatch.setattr(vision._Setting, "forward", forward)
    monkeypatch.setattr(vision._Setting, "reference", reference)
    monkeypatch.setattr(vision, "_timed", lambda fn, device: (fn(), 1.0 if events[-1][0] == "merged" else 3.0)[1])
    batch = torch.randn(4, 1, 28, 28)
    jobs = [(None, 0, {}), ("tome", 4, {}), ("tome", 8, {})]
    timed = vision.time_settings_together(model, jobs, batch, 3)
    merged = [r for kind, r in events[6:] if kind == "merged"]  # after one warm-up pass of each
    assert merged == [0, 4, 8, 4, 8, 0, 8, 0, 4]  # the order rotates from round to round
    assert all(events[i + 1][0] == "unpatched" for i in range(6, len(events), 2))  # each merged run, then the reference
    assert [t["speedup_per_round"] for t in timed] == [[3.0] * 3] * 3 and all(t["speedup"] == 3.0 for t in timed)
    assert all(t["seconds_per_round"] == [1.0] * 3 and t["unpatched_seconds_per_round"] == [3.0] * 3 for t in timed)
    monkeypatch.setattr(vision, "cpu_counters", _readings())
    timed = vision.time_settings_together(model, jobs, batch, 1)
    assert [t["timing_steal_share"] for t in timed] == [0.1] * 3  # the rounds of all share one stretch
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # the copies were patched
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    labels = torch.zeros(8, dtype=torch.long)
    together = run_vision_eval(model, images, labels, jobs[1:], batch_size=4, timing_rounds=2, timing="together")
    paired = run_vision_eval(model, images, labels, jobs[1:], batch_size=4, timing_rounds=2, timing="paired")
    for a, b in zip(together, paired, strict=True):
        assert a["speedup_per_round"] == [3.0, 3.0] and a.keys() == b.keys()
        assert a["timing_steal_share"] == b["timing_steal_share"] == 0.1
        assert {k: a[k] for k in ("method", "r", "accuracy", "mean_tokens_per_layer")} == \
            {k: b[k] for k in ("method", "r", "accuracy", "mean_tokens_per_layer")}
    with pytest.raises(ValueError, match="timing must be one of"):
        run_vision_eval(model, images, labels, jobs[1:], batch_size=4, timing="interleaved")


def test_bucketed_budgets_are_timed_against_the_unpatched_model_on_the_same_sub_batches():
    from quickmerge.data.fashion_mnist import normalize
    from quickmerge.vision.image_budget import ImageBudget

    model = timm_vit.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=2,
                                       num_heads=2).eval()
    images = torch.zeros(24, 1, 28, 28, dtype=torch.uint8)
    for i in range(24):  # objects of growing size on a plain background: every bucket gets images
        side = 3 + i
        images[i, 0, :side, :side] = torch.randint(100, 256, (side, side), generator=torch.Generator().manual_seed(i))
    labels = torch.zeros(24, dtype=torch.long)
    budget = ImageBudget.calibrate(normalize(images), patch_size=4, num_tokens=49, num_layers=2, r=8, buckets=3)
    sizes = [index.numel() for _, index in budget.sub_batches(normalize(images))]
    assert len(sizes) == 3 and len(set(budget.r)) > 1
    reference = timm_vit.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=16,
                                           depth=2, num_heads=2).eval()
    seen: list[int] = []
    reference.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    settings = {"label": "quickmerge-per-image", "image_budget": budget.to_dict()}
    row = evaluate_setting(model, reference, images, labels, method="quickmerge", r=8, batch_size=24, timing_rounds=2,
                           settings=settings)
    assert seen == sizes * 2 and row["timing_sub_batches"] == sizes
    seen.clear()
    row = evaluate_setting(model, reference, images, labels, method="quickmerge", r=8, batch_size=24, timing_rounds=2)
    assert seen == [24, 24] and row["timing_sub_batches"] == [24]


def test_the_differences_against_tome_are_drawn_with_their_intervals_and_only_with_them(tmp_path):
    plt = pytest.importorskip("matplotlib.pyplot")
    from quickmerge.eval.vision import draw_paired_differences, plot_vision_eval

    comparisons = {"quickmerge_vs_tome": [
                       {"r": 16, "speedup": 1.2, "difference": -0.001, "low": -0.003, "high": 0.002},
                       {"r": 98, "speedup": 2.9, "difference": None}],
                   "quickmerge_entropy_vs_tome": [{"r": 16, "speedup": 1.2, "difference": 0.004}]}  # no interval
    fig, ax = plt.subplots()
    assert draw_paired_differences(ax, comparisons)
    (bars,) = ax.containers  # one method has intervals: one error-bar series
    assert list(bars.lines[0].get_ydata()) == pytest.approx([-0.1])  # points, not shares
    low, high = bars.lines[2][0].get_segments()[0][:, 1]  # the bar's ends
    assert (low, high) == (pytest.approx(-0.3), pytest.approx(0.2))
    plt.close(fig)
    fig, ax = plt.subplots()
    assert not draw_paired_differences(ax, {"quickmerge_vs_tome": [{"r": 16, "speedup": 1.2, "difference": 0.0}]})
    assert not ax.lines and not ax.containers
    plt.close(fig)
    rows = [{"method": "none", "r": 0, "speedup": 1.0, "accuracy": 0.9},
            {"method": "tome", "r": 16, "speedup": 1.2, "accuracy": 0.9},
            {"method": "quickmerge", "r": 16, "speedup": 1.2, "accuracy": 0.899}]
    widths = []
    for name, given in (("two.png", None), ("three.png", comparisons)):
        plot_vision_eval(rows, str(tmp_path / name), "t", given)
        widths.append(plt.imread(tmp_path / name).shape[1])
    assert widths == [12 * 130, 18 * 130]  # a third panel only where there are intervals
