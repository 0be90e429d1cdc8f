import importlib

import pytest

from quickmerge.cli import build_parser


def test_demo_arguments_are_validated():
    args = build_parser().parse_args(["demo-encoder", "--keep", "0.5"])
    assert args.command == "demo-encoder" and args.keep == 0.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo-encoder", "--keep", "1.5"])
    assert build_parser().parse_args(["demo", "--ratio", "0.25"]).ratio == 0.25
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--ratio", "1"])
    args = build_parser().parse_args(["eval", "text", "--examples", "3", "--methods", "quickmerge"])
    assert args.protocol == "text" and args.examples == 3 and args.methods == ["quickmerge"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "text", "--methods", "no-such-method"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


def test_vision_arguments_are_validated(capsys):

    args = build_parser().parse_args(["eval", "vision", "--methods", "tome", "quickmerge", "--r", "8", "16"])
    assert args.protocol == "vision" and args.methods == ["tome", "quickmerge"] and args.r == [8, 16]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "vision", "--methods", "magic"])
    _refused(capsys, ["eval", "vision", "--images", "0"], "--images")
    _refused(capsys, ["visualize", "--images", "0"], "--images")
    assert build_parser().parse_args(["train", "vision", "--epochs", "1"]).epochs == 1


def test_vision_r_past_what_a_block_can_merge_is_refused_before_the_data_is_read(monkeypatch, refused):
    """r = 500 used to run as r = 98 in every block (ToMe's cap), a silent truncation."""
    pytest.importorskip("safetensors")

    def no_data(*args, **kwargs):
        raise AssertionError("data read before the arguments were checked")

    monkeypatch.setattr("quickmerge.data.fashion_mnist.load_fashion_mnist", no_data)
    refused(["eval", "vision", "--r-values", "16", "500", "--out", "unused"],
            r"at most 98 of its 196 patch tokens.*\(quickmerge, tome\).*got 500; --matching greedy lifts the cap")
    refused(["eval", "vision", "--matching", "greedy", "--r-values", "120", "--out", "unused"],
            r"at most 98 of its 196 patch tokens by bipartite matching \(tome\).*got 120$")
    refused(["eval", "vision", "--matching", "greedy", "--methods", "quickmerge", "--r-values", "190", "--out",
             "unused"], r"keeps at least 8 of the 196 patch tokens, so r above 188 runs as r = 188; got 190")
    refused(["visualize", "--r", "120", "--out", "unused"],
            r"--r: a block of this model merges at most 98 .*\(quickmerge\).*got 120; --matching greedy lifts the cap")
    refused(["visualize", "--r", "190", "--matching", "greedy", "--out", "unused"],
            r"--r: every block keeps at least 8 of the 196 patch tokens.*got 190")


def _refused(capsys, argv: list[str], flag: str) -> None:
    """argparse refuses ``argv`` before any work, naming ``flag`` and what it expected."""
    from quickmerge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "expected" in err, err


@pytest.mark.parametrize("argv, flag", [
    (["eval", "text", "--threads", "0"], "--threads"),
    (["eval", "video", "--threads", "-1"], "--threads"),
    (["eval", "vision", "--threads", "0"], "--threads"),
    (["train", "vision", "--finetune", "ckpt", "--r-per-block", "8", "--self-distill", "2"], "--self-distill"),
    (["train", "vision", "--finetune", "ckpt", "--r-per-block", "8", "--self-distill", "nan"], "--self-distill"),
    (["eval", "vision", "--timing-rounds", "0"], "--timing-rounds"),
    (["eval", "vision", "--r-values", "8", "0"], "--r-values/--r"),
    (["train", "vision", "--epochs", "0"], "--epochs"),
    (["train", "vision", "--lr", "0"], "--lr"),
    (["train", "vision", "--batch-size", "0"], "--batch-size"),
    (["train", "vision", "--teacher-epochs", "-1"], "--teacher-epochs"),
    (["train", "vision", "--threads", "0"], "--threads"),
    (["train", "ar-video", "--steps", "0"], "--steps"),
    (["train", "ar-image", "--batch-size", "0"], "--batch-size"),
    (["train", "ar-image", "--lr", "-1"], "--lr"),
    (["train", "ar-image", "--threads", "x"], "--threads"),
    (["visualize", "video-ar", "--examples", "0"], "--examples"),
])
def test_numbers_out_of_range_are_refused_by_flag_before_any_work(capsys, argv, flag):
    _refused(capsys, argv, flag)


def test_finetune_r_has_a_spelling_torchrun_leaves_alone():
    """torchrun takes ``--r`` for one of its own ``--rdzv-*`` options; ``--r-per-block`` reaches us."""
    from torch.distributed.run import get_args_parser

    for spelling in ("--r", "--r-per-block"):
        args = build_parser().parse_args(["train", "vision", "--finetune", "ckpt", spelling, "40"])
        assert args.r == 40
    launched = get_args_parser().parse_args(["--nproc_per_node", "2", "-m", "quickmerge", "train", "vision",
                                             "--r-per-block", "40"])
    assert launched.training_script_args[-2:] == ["--r-per-block", "40"]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(["-m", "quickmerge", "train", "vision", "--r", "40"])


def test_train_vision_teacher_and_seed_are_validated_before_any_work(refused):
    args = build_parser().parse_args(["train", "vision", "--teacher-epochs", "3", "--seed", "7"])
    assert args.teacher_epochs == 3 and args.seed == 7
    refused(["train", "vision", "--finetune", "ckpt", "--r-per-block", "8", "--teacher-epochs", "2",
            "--out", "unused"], "--teacher-epochs")
    refused(["train", "vision", "--self-distill", "0.5", "--out", "unused"], "--self-distill applies to --finetune")
    refused(["train", "vision", "--learned-saliency", "--out", "unused"], "--learned-saliency applies to --finetune")
    refused(["train", "vision", "--finetune", "ckpt", "--method", "tome", "--r-per-block", "8", "--learned-saliency",
             "--out", "unused"], "learned saliency needs method 'quickmerge'")
    refused(["train", "vision", "--saliency-rule", "scaled", "--out", "unused"], "apply to --finetune only")
    refused(["train", "vision", "--finetune", "ckpt", "--method", "tome", "--r-per-block", "8", "--similarity",
             "hidden", "--out", "unused"], "QuickMerge\\+\\+'s settings")


@pytest.mark.parametrize("argv", [
    ["train", "vision", "--finetune", "{missing}", "--r-per-block", "8"],
    ["train", "vision", "--init", "{missing}"],
    ["eval", "video", "--model", "{missing}"],
    ["visualize", "image-ar", "--model", "{missing}"],
])
def test_a_missing_model_directory_is_one_line_before_any_data_is_read(argv, tmp_path, capsys, monkeypatch):
    pytest.importorskip("safetensors")
    pytest.importorskip("transformers")
    from quickmerge.cli import main

    def no_data(*args, **kwargs):
        raise AssertionError("data read before the model was found")

    # imported before any patching: a module first imported while its source is patched would keep no_data
    for module in ("quickmerge.data.fashion_mnist", "quickmerge.vision.train", "quickmerge.ar.data",
                   "quickmerge.data.video"):
        importlib.import_module(module)
    for module in ("quickmerge.data.fashion_mnist", "quickmerge.vision.train", "quickmerge.ar.data"):
        monkeypatch.setattr(f"{module}.load_fashion_mnist", no_data)
    for module in ("quickmerge.data.video", "quickmerge.ar.data"):
        monkeypatch.setattr(f"{module}.read_clip", no_data)
    missing = tmp_path / "no-model"
    code = main([a.format(missing=missing) for a in argv] + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "Traceback" not in err, err


def test_a_model_path_that_does_not_exist_is_named_not_taken_for_a_hub_id(tmp_path):
    pytest.importorskip("transformers")
    from quickmerge.errors import MissingDataError
    from quickmerge.pretrained.causal_lm import load_causal_lm

    with pytest.raises(MissingDataError, match=r"no model directory at .*no-model"):
        load_causal_lm(str(tmp_path / "no-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingDataError, match=r"could not load the model .*empty"):
        load_causal_lm(str(tmp_path / "empty"))  # a directory without a model: transformers' ValueError


def test_help_and_a_mistyped_command_answer_without_importing_torch():
    """``eval``, ``visualize`` and ``train`` take their choices from modules that import torch: the parser adds their
    arguments only for the command named, and ``import quickmerge`` imports a public name's module on first use."""
    import subprocess
    import sys

    from tests.launch import child_env

    code = ("import sys\nfrom quickmerge.cli import main\nfor argv in (['--help'], ['evl'], ['--version'], []):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert "usage: quickmerge" in out.stdout and "invalid choice: 'evl'" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["eval", "vision", "--methods", "tome", "--r", "8"],
                                  ["eval", "text", "--examples", "3"],
                                  ["visualize", "--r", "8", "image-ar", "--examples", "2"],
                                  ["train", "vision", "--finetune", "ckpt", "--r", "16"], ["train", "ar-video"],
                                  ["demo", "--ratio", "0.25"], ["env"]])
def test_the_named_command_parses_as_with_every_command_built(argv):
    assert vars(build_parser(argv).parse_args(argv)) == vars(build_parser().parse_args(argv))
    if argv[0] in ("eval", "visualize", "train"):  # built only when named
        with pytest.raises(SystemExit):
            build_parser(["demo"]).parse_args(argv)
