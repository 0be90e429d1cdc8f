"""Cost of the stable descending sort behind every selection since stop 65, against argsort and a top-k of a third,
on the shapes the merges sort (ToMe-style edges [256, 98], ranks [256, 196], a KV head row [8, 4096]); 1 thread,
alternating, medians of 30 rounds of 20 calls, microseconds.

    python benchmarks/exploration/sort_cost.py
"""
import statistics, time, torch
torch.set_num_threads(1)
torch.manual_seed(0)
for shape in ((256, 98), (256, 196), (8, 4096)):
    x = torch.randn(*shape)
    t = {"argsort": [], "stable sort": [], "topk": []}
    for _ in range(30):
        for name in t:
            s = time.perf_counter()
            for _ in range(20):
                if name == "argsort": x.argsort(dim=-1, descending=True)
                elif name == "topk": x.topk(shape[1] // 3, dim=-1)
                else: x.sort(dim=-1, descending=True, stable=True)
            t[name].append((time.perf_counter() - s) / 20 * 1e6)
    print(shape, {k: round(statistics.median(v), 1) for k, v in t.items()}, "us")
