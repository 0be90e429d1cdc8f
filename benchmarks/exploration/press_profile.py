"""Where QuickMergePress spends its prefill time: its parts timed inside a real SmolLM2 prefill (shares only).

    .venv/bin/python benchmarks/exploration/press_profile.py 2048
"""
import sys, time, torch, collections
torch.set_num_threads(1)
from transformers import DynamicCache
from quickmerge.pretrained.causal_lm import load_causal_lm
from quickmerge.text import QuickMergePress
from quickmerge.text import quickmerge_press as qp, scoring, kv_press
from quickmerge.eval.text import wikipedia_windows
C = int(sys.argv[1])
model, tok = load_causal_lm("smollm2-135m")
ex = wikipedia_windows(tok, 1, C, 1)[0]
ids = ex.ids[None, :C]
T = collections.defaultdict(float)
def wrap(obj, name, label):
    f = getattr(obj, name)
    def g(*a, **k):
        s = time.perf_counter(); out = f(*a, **k); T[label] += time.perf_counter() - s; return out
    setattr(obj, name, g)
wrap(qp, "assign_to_seeds", "assign")
wrap(qp, "observe", "observe")
wrap(qp, "saliency", "saliency")
wrap(qp, "weighted_mean", "weighted_mean")
wrap(kv_press, "merged_layer", "merged_layer")
press = QuickMergePress(compression_ratio=0.5)
wrap(press, "score", "score(total)")
wrap(press, "merge", "merge(total)")
with torch.no_grad():
    for rep in range(2):
        s = time.perf_counter(); model.model(input_ids=ids, past_key_values=DynamicCache()); base = time.perf_counter() - s
        T.clear()
        with press(model):
            s = time.perf_counter(); model.model(input_ids=ids, past_key_values=DynamicCache()); t = time.perf_counter() - s
        print(f"C={C} none {base:.2f}s press {t:.2f}s (+{100*(t/base-1):.1f}%)", {k: round(v, 3) for k, v in T.items()}, flush=True)
