"""Refactor check: the benchmarks' training loop before (f500a83's ``rope_vit.py`` and ``siglip2_naflex.py`` copied
to /tmp/eqv as ``*_old.py``) and after (``benchmarks/resumable_training.py``): one epoch on the first 300 training
images each; parameters and losses must be identical."""

import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path[:0] = ["/tmp/eqv", str(Path(__file__).resolve().parents[1])]
from quickmerge.data.fashion_mnist import load_fashion_mnist  # noqa: E402

images, labels = load_fashion_mnist("train")
torch.set_num_threads(2)
for old, new in (("rope_vit_old", "rope_vit"), ("siglip2_naflex_old", "siglip2_naflex")):
    runs = []
    for name in (old, new):
        module = importlib.import_module(name)
        module.load_fashion_mnist = lambda split="train", **_: (images[:300], labels[:300])
        with tempfile.TemporaryDirectory() as directory:
            torch.manual_seed(0)
            module.train(Path(directory), 1, 128, 1e-3, 0)
            state = torch.load(Path(directory) / "model.pt")
            log = json.loads((Path(directory) / "train_log.json").read_text())["log"]
        runs.append((state, [e["mean_loss"] for e in log]))
    (a, loss_a), (b, loss_b) = runs
    print(new, "max |parameter difference|", max((a[k] - b[k]).abs().max().item() for k in a), loss_a, loss_b)
