import pytest

from quickmerge.cli import build_parser


def test_demo_arguments_are_validated():
    args = build_parser().parse_args(["demo", "--keep", "0.5"])
    assert args.command == "demo" and args.keep == 0.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--keep", "1.5"])
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
