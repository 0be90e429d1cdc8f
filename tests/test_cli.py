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
    from quickmerge.cli import main

    args = build_parser().parse_args(["eval", "vision", "--methods", "tome", "quickmerge", "--r", "8", "16"])
    assert args.protocol == "vision" and args.methods == ["tome", "quickmerge"] and args.r == [8, 16]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "vision", "--methods", "magic"])
    with pytest.raises(SystemExit, match="--images"):
        main(["eval", "vision", "--images", "0"])
    with pytest.raises(SystemExit, match="--images"):
        main(["visualize", "--images", "0"])
    assert build_parser().parse_args(["train", "vision", "--epochs", "1"]).epochs == 1


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


def test_train_vision_teacher_and_seed_are_validated_before_any_work():
    from quickmerge.cli import main

    args = build_parser().parse_args(["train", "vision", "--teacher-epochs", "3", "--seed", "7"])
    assert args.teacher_epochs == 3 and args.seed == 7
    with pytest.raises(SystemExit, match="teacher_epochs"):
        main(["train", "vision", "--teacher-epochs", "-1", "--out", "unused"])
    with pytest.raises(SystemExit, match="--teacher-epochs"):
        main(["train", "vision", "--finetune", "ckpt", "--r-per-block", "8", "--teacher-epochs", "2",
              "--out", "unused"])
