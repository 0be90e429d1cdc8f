"""Refactor check: score_example / generate_continuation / answer_passkey on real SmolLM2, one JSON per code version."""
import json, sys, torch
torch.set_num_threads(1)
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.eval.text import wikipedia_windows, score_example, generate_continuation
from quickmerge.eval.text_methods import build_method
from quickmerge.eval.retrieval import passkey_trials, answer_passkey
model, tok = load_causal_lm("smollm2-135m")
ex = wikipedia_windows(tok, 2, context=256, continuation=16)
trials = passkey_trials(tok, 1, min_context=300, max_context=320)
out = {}
for name in ["quickmerge", "kvpress-snapkv", "kvpress-adakv-expected-attention", "kvpress-observed-attention", "random"]:
    m = build_method(name)
    for i, e in enumerate(ex):
        r = score_example(model, e, 256, m.make(0.5), m, 0.5)
        out[f"{name}/{i}"] = [round(r["nll"], 6), r["achieved_ratio"], r["memory_saved"]]
    out[f"{name}/gen"] = generate_continuation(model, ex[0], 256, 6, m.make(0.5), m).tolist()
    a = answer_passkey(model, tok, trials[0], m.make(0.5), m, new_tokens=4)
    out[f"{name}/pk"] = a["answer"]
json.dump(out, open(sys.argv[1], "w"), indent=1)
