"""Training: augmentation, the same update on one process and on two (DistributedDataParallel, the
same global batch), resumption after an interrupted epoch, and the shipped checkpoint left alone."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("timm")
st = pytest.importorskip("safetensors.torch")

from quickmerge.vision.train import DEFAULT_OUT, Recipe, augment, train  # noqa: E402
from tests.launch import child_env, rank_errors  # noqa: E402
from tests.vision.ddp_train import CONFIG, synthetic  # noqa: E402

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def test_augment_flips_and_shifts_each_image_on_its_own():
    x = torch.arange(2 * 28 * 28, dtype=torch.float32).view(2, 1, 28, 28)
    out = augment(x, torch.Generator().manual_seed(3), max_shift=2)
    assert out.shape == x.shape
    for i in range(2):  # each output is its image (maybe flipped) shifted by at most 2 pixels
        candidates = [x[i], x[i].flip(-1)]
        assert any(torch.equal(out[i, 0, 2:-2, 2:-2], c[0, 2 + dy : 26 + dy, 2 + dx : 26 + dx])
                   for c in candidates for dy in range(-2, 3) for dx in range(-2, 3))
    flipped_only = augment(x, torch.Generator().manual_seed(3), 0)
    assert all(torch.equal(flipped_only[i], x[i]) or torch.equal(flipped_only[i], x[i].flip(-1)) for i in range(2))


def test_two_processes_make_the_update_of_one(tmp_path):
    env = child_env(TQDM_DISABLE="1")
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "tests/vision/ddp_train.py", str(one)], check=True, cwd=ROOT, env=env,
                   capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "tests/vision/ddp_train.py", str(two)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, rank_errors(result.stderr)
    a, b = st.load_file(str(one / "model.safetensors")), st.load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), max((a[k] - b[k]).abs().max() for k in a)
    assert json.loads((two / "config.json").read_text())["training"]["processes"] == 2


def test_an_interrupted_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    from quickmerge.vision import train as train_module

    data, test = (synthetic(0), synthetic(1)), synthetic(2)
    recipe = Recipe(epochs=2, batch_size=16, warmup_steps=2, teacher_epochs=0, ema_decay=0.0)
    full = train(tmp_path / "full", recipe=recipe, config=CONFIG, data=data, test=test)
    # the same run, interrupted in its second epoch (before that epoch's checkpoint), then run again
    part, calls, real_accuracy = tmp_path / "part", [], train_module.accuracy

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_accuracy(*args, **kwargs)

    monkeypatch.setattr(train_module, "accuracy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(part, recipe=recipe, config=CONFIG, data=data, test=test)
    monkeypatch.setattr(train_module, "accuracy", real_accuracy)
    assert (part / "checkpoint.pt").exists() and not (part / "model.safetensors").exists()
    resumed = train(part, recipe=recipe, config=CONFIG, data=data, test=test)
    a, b = st.load_file(str(tmp_path / "full" / "model.safetensors")), st.load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_accuracy"] == full["test_accuracy"] and not (part / "checkpoint.pt").exists()
    torch.save({"identity": {"recipe": "another"}}, part / "checkpoint.pt")
    with pytest.raises(ValueError, match="--fresh"):
        train(part, recipe=Recipe(epochs=2, batch_size=16, teacher_epochs=0), config=CONFIG, data=data, test=test)


def test_the_shipped_checkpoint_is_not_the_default_output():
    from quickmerge.cli import build_parser
    from quickmerge.pretrained.fashion_vit import ASSET_DIR

    assert Path(build_parser().parse_args(["train", "vision"]).out) == DEFAULT_OUT
    assert DEFAULT_OUT.resolve() != ASSET_DIR.resolve()


def test_distillation_trains_a_teacher_and_keeps_it_in_the_checkpoint(tmp_path, monkeypatch):
    from quickmerge.vision import train as train_module

    data, test = (synthetic(0), synthetic(1)), synthetic(2)
    recipe = Recipe(epochs=1, batch_size=16, warmup_steps=2, teacher_epochs=1, distill_weight=0.5)
    taught = []
    real = train_module.train_teacher
    monkeypatch.setattr(train_module, "train_teacher", lambda *a, **k: taught.append(1) or real(*a, batch_size=16, **k))
    summary = train(tmp_path / "distilled", recipe=recipe, config=CONFIG, data=data, test=test)
    assert taught == [1] and summary["training"]["teacher_epochs"] == 1
    log = json.loads((tmp_path / "distilled" / "train_log.json").read_text())
    assert 0.0 <= log["teacher_heldout_accuracy"] <= 1.0


@pytest.mark.parametrize("method", ["quickmerge", "tome"])
def test_merge_aware_finetuning_merges_while_training_and_anneals(tmp_path, monkeypatch, method):
    import importlib

    from quickmerge.vision import train as train_module

    patch_module = importlib.import_module("quickmerge.vision.patch")  # the package exports a function of that name
    data, test = (synthetic(0), synthetic(1)), synthetic(2)
    base = Recipe(epochs=1, batch_size=16, warmup_steps=2, teacher_epochs=0, ema_decay=0.0)
    train(tmp_path / "base", recipe=base, config=CONFIG, data=data, test=test)
    seen = []  # (training?, temperature, tokens left) of every merge
    real_finish = patch_module.MergeHandle._finish

    def spy(handle, *args):
        out = real_finish(handle, *args)
        seen.append((handle.model.training, handle.temperature, out.shape[1]))
        return out

    monkeypatch.setattr(patch_module.MergeHandle, "_finish", spy)
    finetune = train_module.FineTune(str(tmp_path / "base"), method, r=8, temperature_start=1.0, temperature_end=0.1)
    summary = train(tmp_path / "ft", recipe=Recipe(epochs=2, batch_size=16, warmup_steps=2, teacher_epochs=0,
                                                   ema_decay=0.0), config=CONFIG, data=data, test=test,
                    finetune=finetune)
    training = [s for s in seen if s[0]]
    assert len(training) == 2 * 96 // 16 and all(tokens == 50 - 8 for _, _, tokens in training)  # 1 block, r=8
    temperatures = [t for _, t, _ in training]
    if method == "quickmerge":
        assert temperatures[0] == pytest.approx(1.0) and temperatures[-1] == pytest.approx(0.1)
        assert temperatures == sorted(temperatures, reverse=True)
    else:
        assert set(temperatures) == {None}
    assert any(not s[0] for s in seen)  # evaluated merged, too
    assert summary["finetune"]["method"] == method and summary["finetune"]["r"] == 8
    # the saved weights are a plain ViT: they load and run unpatched
    from quickmerge.pretrained.fashion_vit import load_fashion_vit

    assert load_fashion_vit(tmp_path / "ft")(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    with pytest.raises(ValueError, match="exactly one of r and ratio"):
        train_module.FineTune(str(tmp_path / "base"), method)


def test_self_distillation_matches_the_unmerged_starting_model(tmp_path, monkeypatch):
    import importlib

    from quickmerge.vision import train as train_module

    patch_module = importlib.import_module("quickmerge.vision.patch")
    data, test = (synthetic(0), synthetic(1)), synthetic(2)
    recipe = Recipe(epochs=1, batch_size=16, warmup_steps=2, teacher_epochs=0, ema_decay=0.0)
    config = {**CONFIG, "depth": 2}  # one block would merge after the class token's last read
    train(tmp_path / "base", recipe=recipe, config=config, data=data, test=test)
    pairs, merges = [], []  # (student, teacher) log-probabilities of each distillation step; merges by mode
    real_kl, real_finish = train_module.F.kl_div, patch_module.MergeHandle._finish
    monkeypatch.setattr(train_module.F, "kl_div", lambda s, t, **k: pairs.append((s.detach(), t)) or real_kl(s, t, **k))
    monkeypatch.setattr(patch_module.MergeHandle, "_finish",
                        lambda handle, *a: merges.append(handle.model.training) or real_finish(handle, *a))

    def finetune(name, r, self_distill):
        pairs.clear(), merges.clear()
        ft = train_module.FineTune(str(tmp_path / "base"), "quickmerge", r=r, self_distill=self_distill)
        train(tmp_path / name, recipe=recipe, config=config, data=data, test=test, finetune=ft)

    finetune("labels", 8, 0.0)
    assert pairs == []  # labels only
    # nothing merged: the first step's student is the starting model itself, so the target is its own prediction
    finetune("still", 0, 1.0)
    assert len(pairs) == 96 // 16 and torch.equal(pairs[0][0], pairs[0][1])
    # merged: the teacher reads every token (it differs from the merged student) and merges nothing itself
    finetune("merged", 8, 0.5)
    assert len(pairs) == 96 // 16 and not torch.allclose(pairs[0][0], pairs[0][1], atol=1e-4)
    assert merges.count(True) == 2 * 96 // 16
    with pytest.raises(ValueError, match="self_distill must lie in"):
        train_module.FineTune(str(tmp_path / "base"), "tome", r=8, self_distill=1.5)


def test_a_finetune_matches_as_asked_and_records_it(tmp_path, monkeypatch):
    import importlib

    from quickmerge.pretrained.fashion_vit import fine_tuned_merging
    from quickmerge.vision import train as train_module

    patch_module = importlib.import_module("quickmerge.vision.patch")
    data, test = (synthetic(0), synthetic(1)), synthetic(2)
    recipe = Recipe(epochs=1, batch_size=16, warmup_steps=2, teacher_epochs=0, ema_decay=0.0)
    train(tmp_path / "base", recipe=recipe, config=CONFIG, data=data, test=test)
    seen = set()  # (training?, similarity, rule) of every QuickMerge++ merge
    real_merge = patch_module.MergeHandle.merge

    def spy(handle, layer, x):
        seen.add((handle.model.training, handle.similarity, handle.saliency_rule))
        return real_merge(handle, layer, x)

    monkeypatch.setattr(patch_module.MergeHandle, "merge", spy)
    ft = train_module.FineTune(str(tmp_path / "base"), "quickmerge", r=8, similarity="hidden", saliency_rule="scaled")
    summary = train(tmp_path / "ft", recipe=recipe, config=CONFIG, data=data, test=test, finetune=ft)
    assert seen == {(True, "hidden", "scaled"), (False, "hidden", "scaled")}  # trained and evaluated so
    recorded = fine_tuned_merging(tmp_path / "ft")
    assert recorded["similarity"] == "hidden" and recorded["saliency_rule"] == "scaled"
    assert summary["finetune"] == recorded
    for bad, match in (({"similarity": "values"}, "similarity must be one of"),
                       ({"method": "tome", "saliency_rule": "scaled"}, "QuickMerge\\+\\+'s settings"),
                       ({"learned_saliency": True, "saliency_rule": "scaled"}, "additive rule")):
        with pytest.raises(ValueError, match=match):
            train_module.FineTune(str(tmp_path / "base"), **{"method": "quickmerge", "r": 8, **bad})


def test_a_learned_saliency_trains_through_the_relaxed_merge_and_is_saved_beside_the_model(tmp_path):
    from quickmerge.pretrained.fashion_vit import load_fashion_vit
    from quickmerge.vision import TokenScorer, patch
    from quickmerge.vision import train as train_module

    data, test = (synthetic(0), synthetic(1)), synthetic(2)
    recipe = Recipe(epochs=1, batch_size=16, warmup_steps=2, teacher_epochs=0, ema_decay=0.0, lr=1e-2)
    config = {**CONFIG, "depth": 2}
    train(tmp_path / "base", recipe=recipe, config=config, data=data, test=test)
    ft = train_module.FineTune(str(tmp_path / "base"), "quickmerge", r=8, learned_saliency=True)
    summary = train(tmp_path / "ft", recipe=recipe, config=config, data=data, test=test, finetune=ft)
    scorer = TokenScorer.load(tmp_path / "ft")
    assert scorer.weight.shape == (2, config["embed_dim"]) and scorer.weight.abs().sum() > 0  # it learned
    model = load_fashion_vit(tmp_path / "ft")  # the model file is a plain ViT
    assert not any(k.startswith("quickmerge_scorer") for k in model.state_dict())
    # the saved test accuracy is the one of the model merging with its scorer, not without
    from quickmerge.vision.train import accuracy

    with patch(model, r=8, scorer=scorer):
        assert "quickmerge_scorer.weight" in model.state_dict()
        with_scorer = accuracy(model, *test)
    assert not hasattr(model, "quickmerge_scorer")  # unpatched: gone again
    assert summary["test_accuracy"] == pytest.approx(with_scorer)
    # the scorer learns in a group of its own, at its own rate and without weight decay
    from quickmerge.vision.train import _param_groups

    with patch(model, r=8, scorer=scorer):
        groups = _param_groups(model, 0.05, 1e-3, 0.1)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 0.1] and groups[2]["weight_decay"] == 0.0
    assert groups[2]["params"] == [scorer.weight]
    assert sum(len(g["params"]) for g in groups[:2]) == len(list(model.parameters()))
    with pytest.raises(ValueError, match="scorer_lr_scale must be a finite number > 0"):
        train_module.FineTune(str(tmp_path / "base"), "quickmerge", r=8, learned_saliency=True, scorer_lr_scale=0)
    with pytest.raises(ValueError, match="applies to a learned saliency only"):
        train_module.FineTune(str(tmp_path / "base"), "quickmerge", r=8, scorer_lr_scale=10)
    with pytest.raises(ValueError, match="learned saliency needs method 'quickmerge'"):
        train_module.FineTune(str(tmp_path / "base"), "tome", r=8, learned_saliency=True)
    with pytest.raises(FileNotFoundError, match=r"token_scorer\.safetensors"):
        TokenScorer.load(tmp_path / "base")


def test_a_warm_restart_starts_from_the_given_weights(tmp_path):
    data, test = (synthetic(0), synthetic(1)), synthetic(2)
    recipe = Recipe(epochs=1, batch_size=16, warmup_steps=2, teacher_epochs=0, ema_decay=0.0)
    train(tmp_path / "base", recipe=recipe, config=CONFIG, data=data, test=test)
    still = Recipe(epochs=1, batch_size=16, warmup_steps=2, teacher_epochs=0, ema_decay=0.0, lr=1e-12,
                   weight_decay=0.0)
    summary = train(tmp_path / "again", recipe=still, config={"unused": True}, data=data, test=test,
                    init=tmp_path / "base")
    a, b = st.load_file(str(tmp_path / "base" / "model.safetensors")), st.load_file(str(tmp_path / "again" /
                                                                                       "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the base model's own config and weights
    assert summary["init"]["from"] == str(tmp_path / "base") and summary["model"] == CONFIG
