"""``quickmerge eval decoding --generate``: the coupled noise, the common prefix, and the command end to end on a
tiny random Llama (what each method picks, what is scored, the journal, the refusals)."""

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from quickmerge.eval.generation import common_prefix, coupled_gumbel, pick_tokens, window_seeds
from tests.launch import run_here

# prompt 16, size 24, interval 8: the first merge after 16 decoded tokens, tokens scored from pick 17 of 49
SETTINGS = ["--examples", "4", "--batch", "2", "--prompt", "16", "--continuation", "48", "--sizes", "24",
            "--interval", "8", "--threads", "1", "--generate"]


def test_the_noise_of_a_window_does_not_depend_on_its_batch_and_changes_with_the_step():
    seeds = window_seeds(["0|a||None", "1|b||None", "2|c||None"])
    alone = coupled_gumbel(seeds[1:2], 5, 300)
    together = coupled_gumbel(seeds, 5, 300)
    assert torch.equal(together[1:2], alone)
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(coupled_gumbel(seeds, 6, 300), together)


def test_the_noise_is_standard_gumbel():
    noise = coupled_gumbel(window_seeds([f"{i}|w||None" for i in range(20)]), 3, 10_000).double().flatten()
    assert abs(float(noise.mean()) - 0.5772) < 0.01  # Euler's constant
    assert abs(float(noise.std()) - math.pi / math.sqrt(6)) < 0.01
    below_zero = float((noise < 0).double().mean())
    assert abs(below_zero - math.exp(-1)) < 0.005  # P(g < 0) = exp(-exp(0))


def test_coupled_picks_sample_the_softmax_and_temperature_zero_is_the_argmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    seeds = window_seeds(["0|w||None"])
    picks = torch.cat([pick_tokens(logits, 1.0, seeds, step) for step in range(20_000)])
    share = torch.bincount(picks, minlength=4).double() / len(picks)
    assert torch.allclose(share, logits.double().softmax(-1)[0], atol=0.01)
    colder = torch.cat([pick_tokens(logits, 0.25, seeds, step) for step in range(5_000)])
    assert float((colder == 0).double().mean()) > 0.95  # softmax(logits / 0.25)[0] = 0.98
    assert int(pick_tokens(logits, 0.0, seeds, 0)) == 0


def test_common_prefix_counts_the_leading_equal_tokens():
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    tokens = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [7, 2, 3, 4]])
    assert common_prefix(tokens, reference).tolist() == [4, 1, 0]


@pytest.fixture(scope="module")
def lm_dir(tiny_lm_dir):
    """The tiny Llama, and the Wikipedia windows' data (gensim's) it decodes."""
    pytest.importorskip("gensim")
    return tiny_lm_dir


def _command(model_dir: str, out: Path, *extra: str, methods: tuple[str, ...] = ("quickmerge",)) -> list[str]:
    return [sys.executable, "-m", "quickmerge", "eval", "decoding", "--model", model_dir, *SETTINGS,
            "--methods", *methods, "--out", str(out), *extra]


def _journal_tokens(out: Path) -> dict[str, list[int]]:
    return {e["key"]: e["row"]["tokens"] for path in sorted(Path(str(out) + ".journal").glob("rank*.jsonl"))
            for e in map(json.loads, path.read_text().splitlines())}


def _row(results: dict, method: str) -> dict:
    return next(r for r in results["summary"] if r["method"] == method)


@pytest.fixture(scope="module")
def greedy(lm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("generation") / "run"
    assert run_here(_command(lm_dir, out)) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def _model_and_prompts(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quickmerge.eval.text import wikipedia_windows

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.set_attn_implementation("sdpa")
    windows = wikipedia_windows(AutoTokenizer.from_pretrained(model_dir), 4, context=16, continuation=48)
    return model, windows


def test_uncompressed_generation_is_the_model_s_own_greedy_continuation(lm_dir, greedy):
    out, results = greedy
    model, windows = _model_and_prompts(lm_dir)
    prompts = torch.stack([w.ids[:16] for w in windows])
    with torch.no_grad():  # transformers' own greedy decoding, one sequence at a time
        expected = [model.generate(p[None], max_new_tokens=49, do_sample=False, min_new_tokens=49,
                                   eos_token_id=None, pad_token_id=0)[0, 16:].tolist() for p in prompts]
    tokens = _journal_tokens(out)
    assert [tokens[f"{i}|{w.title}|none|None"] for i, w in enumerate(windows)] == expected
    none = _row(results, "none")
    assert none["identical_tokens"] == none["tokens_scored"] == 49 - 17 and none["identical_to_the_end"] == 1.0


def test_a_method_is_scored_by_the_tokens_it_shares_with_uncompressed_generation_after_the_merge(lm_dir,
                                                                                                greedy):
    from quickmerge.eval.decoding import decode, make_press

    out, results = greedy
    model, windows = _model_and_prompts(lm_dir)
    tokens = _journal_tokens(out)
    ours = [tokens[f"{i}|{w.title}|quickmerge|24"] for i, w in enumerate(windows)]
    none = [tokens[f"{i}|{w.title}|none|None"] for i, w in enumerate(windows)]
    shared = []
    for mine, reference in zip(ours, none, strict=True):
        n = next((k for k, (a, b) in enumerate(zip(mine, reference, strict=True)) if a != b), len(mine))
        assert n >= 17, "differed before the first merge"
        shared.append(n - 17)
    assert _row(results, "quickmerge")["identical_tokens_per_example"] == shared
    assert min(shared) < 49 - 17, "the merged cache never changed a pick: nothing was tested"
    # each pick is the argmax of the merged model fed the picks before it: teacher forcing on its own tokens, in the
    # run's batches of 2 (a random model's logits are close enough that another batch shape can flip a pick)
    ids = torch.cat([torch.stack([w.ids[:16] for w in windows]), torch.tensor(ours)], dim=1)
    for batch in (ids[:2], ids[2:]):
        argmax = []
        decode(model, batch[:, :16], 48, make_press("quickmerge", 24, 8),
               lambda t, logits, batch=batch, argmax=argmax: argmax.append(logits.argmax(-1)) or batch[:, 16 + t])
        assert torch.stack(argmax, 1).tolist() == batch[:, 16:].tolist()


def test_coupled_sampling_follows_the_noise_of_each_window(lm_dir, tmp_path):
    from quickmerge.eval.generation import generated_tokens

    out = tmp_path / "t1"
    assert run_here(_command(lm_dir, out, "--temperature", "1")) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["temperature"] == 1.0 and _row(results, "quickmerge")["temperature"] == 1.0
    model, windows = _model_and_prompts(lm_dir)
    tokens = _journal_tokens(out)
    names = [f"{i}|{w.title}||None" for i, w in enumerate(windows)]
    for i, w in enumerate(windows):  # one window alone, not in its batch of 2: the same picks
        alone, _ = generated_tokens(model, w.ids[None, :16], 48, None, 1.0, window_seeds(names[i : i + 1]))
        assert alone[0].tolist() == tokens[f"{i}|{w.title}|none|None"]
    greedy_picks, _ = generated_tokens(model, torch.stack([w.ids[:16] for w in windows]), 48, None, 0.0,
                                       window_seeds(names))
    assert greedy_picks.tolist() != [tokens[f"{i}|{w.title}|none|None"] for i, w in enumerate(windows)]


def test_kvpress_presses_are_paired_with_ours_at_equal_memory(lm_dir, tmp_path):
    from tests.eval.conftest import require_usable_kvpress

    require_usable_kvpress()
    out = tmp_path / "run"
    assert run_here(_command(lm_dir, out, methods=("quickmerge", "kvpress-tova", "kvpress-knorm"))) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    caches = {m: _row(results, m)["mean_cache_entries"] for m in ("quickmerge", "kvpress-tova", "kvpress-knorm")}
    assert len(set(caches.values())) == 1, caches
    paired = results["paired"]["24"]
    best = max(("kvpress-tova", "kvpress-knorm"), key=lambda m: _row(results, m)["identical_tokens"])
    assert paired["best_kvpress"] == best
    ours, theirs = (_row(results, m)["identical_tokens_per_example"] for m in ("quickmerge", best))
    assert paired["quickmerge_minus_best"][0] == pytest.approx(sum(ours) / 4 - sum(theirs) / 4)
    assert paired["longer_on"] == sum(a > b for a, b in zip(ours, theirs, strict=True))
    assert Path(str(out) + ".png").stat().st_size > 10_000


def test_a_journal_of_another_protocol_or_temperature_is_refused_until_fresh(lm_dir, greedy, tmp_path,
                                                                              refused):
    out = tmp_path / "run"
    shutil.copytree(str(greedy[0]) + ".journal", str(out) + ".journal")
    argv = _command(lm_dir, out)[3:]
    refused([*argv, "--temperature", "0.5"], "protocol.*--fresh")
    refused([a for a in argv if a != "--generate"], "protocol.*--fresh")
    assert run_here(_command(lm_dir, out)) == 0  # the same settings: resumed, nothing computed again


@pytest.mark.parametrize("value", ["-1", "nan", "warm"])
def test_bad_temperatures_are_refused_by_the_parser(tmp_path, capsys, value):
    from quickmerge.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "decoding", *SETTINGS, "--temperature", value])
    assert f"argument --temperature: expected a number >= 0, got '{value}'" in capsys.readouterr().err


def test_a_temperature_without_generation_is_refused_before_a_model_loads(tmp_path, refused):
    teacher_forced = [a for a in SETTINGS if a != "--generate"]
    refused(["eval", "decoding", "--model", str(tmp_path / "none"), *teacher_forced, "--temperature", "1",
             "--out", str(tmp_path / "r")], "--temperature: only with --generate")
    assert not Path(str(tmp_path / "r") + ".journal").exists()
