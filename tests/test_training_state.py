"""The resumable-training checkpoint (quickmerge.training_state)."""

import pytest
import torch
from torch import nn

from quickmerge.training_state import load_training_state, save_training_state

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)


def _parts(seed: int):
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model, "opt": opt, "gen": torch.Generator().manual_seed(seed), "ema": None}


def test_a_saved_state_loads_back_into_fresh_parts(tmp_path):
    saved = _parts(0)
    torch.randn(5, generator=saved["gen"])  # advance the generator past its seed
    save_training_state(tmp_path / "checkpoint.pt", {"run": 1}, saved, step=7)
    fresh = _parts(1)
    state = load_training_state(tmp_path / "checkpoint.pt", {"run": 1}, fresh, torch.device("cpu"))
    assert state["step"] == 7 and state["ema"] is None
    assert torch.equal(fresh["model"].weight, saved["model"].weight)
    moments = [parts["opt"].state_dict()["state"][0]["exp_avg"] for parts in (fresh, saved)]
    assert torch.equal(*moments)
    assert torch.equal(torch.randn(5, generator=fresh["gen"]), torch.randn(5, generator=saved["gen"]))
    assert not (tmp_path / "checkpoint.tmp").exists()


def test_no_checkpoint_gives_none_and_another_configuration_is_refused(tmp_path):
    assert load_training_state(tmp_path / "checkpoint.pt", {"run": 1}, _parts(0), torch.device("cpu")) is None
    save_training_state(tmp_path / "checkpoint.pt", {"run": 1}, _parts(0))
    with pytest.raises(ValueError, match="another training configuration; rerun with --fresh"):
        load_training_state(tmp_path / "checkpoint.pt", {"run": 2}, _parts(0), torch.device("cpu"))
