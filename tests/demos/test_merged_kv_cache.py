"""The main demo's rows name methods the evaluation knows (the demo itself loads a real LM: run by ./run.sh demo)."""

import pytest

from quickmerge.demos import merged_kv_cache as demo
from quickmerge.eval.text_methods import KVPRESS, OURS, build_method

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def test_every_demo_row_is_a_known_method_and_ours_decode_inside_the_press():
    assert [name for _, name in demo.QUICKMERGE_DEMO] == ["quickmerge", "quickmerge-replay-proportional"]
    for _, name in demo.QUICKMERGE_DEMO:
        assert name in OURS and build_method(name).decode_inside
    assert set(demo.KVPRESS_DEMO) <= set(KVPRESS) and "kvpress-kvzip" in demo.KVPRESS_DEMO
    labels = [label for label, _ in demo.QUICKMERGE_DEMO]
    assert len(set(labels)) == len(labels) and all(len(label) <= 30 for label in labels)  # the table's column
