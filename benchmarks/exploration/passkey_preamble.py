"""Passkey: does an instruction preamble help the uncompressed model? (first trials, with and without it)

    .venv/bin/python benchmarks/exploration/passkey_preamble.py 1024 4096 12
"""
import sys, time, torch
torch.set_num_threads(1)
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.eval import retrieval
from quickmerge.eval.text import NO_COMPRESSION
model, tok = load_causal_lm("smollm2-135m")
pre = tok("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about it.\n\n", add_special_tokens=False)["input_ids"]
lo, hi, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
trials = retrieval.passkey_trials(tok, n, min_context=lo, max_context=hi)
ok = [0, 0]
for t in trials:
    for j, use in enumerate([False, True]):
        tr = t
        if use:
            tr = retrieval.PasskeyTrial(t.title, torch.cat([torch.tensor(pre), t.context]), t.question, t.key, t.depth)
        s = time.time()
        r = retrieval.answer_passkey(model, tok, tr, None, NO_COMPRESSION)
        ok[j] += r["correct"]
        print(j, t.context.numel(), round(t.depth, 2), r["correct"], repr(r["answer"]), round(time.time() - s, 1), flush=True)
print("plain", ok[0], "preamble", ok[1], "of", n)
