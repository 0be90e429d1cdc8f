import argparse

import pytest

from quickmerge.errors import UsageError
from quickmerge.eval.cli_common import add_press_run_arguments, check_press_run_arguments

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def parse(*argv: str, extra: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_press_run_arguments(parser, ratios=[0.5], out="results/x", extra_methods=extra)
    return parser.parse_args(list(argv))


def test_defaults_and_extra_methods():
    args = parse()
    assert (args.ratios, args.out, args.methods, args.fresh) == ([0.5], "results/x", None, False)
    assert parse("--methods", "quickmerge-time", extra=["quickmerge-time"]).methods == ["quickmerge-time"]
    with pytest.raises(SystemExit):
        parse("--methods", "quickmerge-time")  # only where the protocol offers it


@pytest.mark.parametrize("ratios", [["0"], ["1"], ["0.5", "1.2"]])
def test_ratios_outside_the_open_interval_are_refused(ratios):
    with pytest.raises(UsageError, match="--ratios must lie in"):
        check_press_run_arguments(parse("--ratios", *ratios), 10, "--examples")


def test_too_few_examples_name_the_flag():
    with pytest.raises(UsageError, match="--trials must be at least 2"):
        check_press_run_arguments(parse(), 1, "--trials")
    check_press_run_arguments(parse(), 2, "--trials")
    check_press_run_arguments(parse(), None, "--examples")  # a count known only once the data is read
    with pytest.raises(UsageError, match="--ratios"):  # ... still has its ratios checked
        check_press_run_arguments(parse("--ratios", "1.5"), None, "--examples")
