"""Redraw a generation run's PNG from its JSON with the current plotting code (the runs' own PNGs were drawn by the
code that ran them; this stop then dashed QuickMerge++'s second window). The title is the command's.

    python docs/results/stop90/replot.py docs/results/stop90/generation_smollm2_greedy.json
"""

import json
import sys
from pathlib import Path

from quickmerge.eval.generation import Generation

for path in map(Path, sys.argv[1:]):
    results = json.loads(path.read_text())
    c = results["config"]
    protocol = Generation(c["temperature"])
    title = (f"{c['model']}: {c['examples']} Wikipedia windows, {c['prompt']}-token prompt kept whole, "
             f"{protocol.describe(c['continuation'])}; full-attention layers merged (QuickMerge++) or evicted "
             "(kvpress)")
    protocol.plot(results, str(path.with_suffix(".png")), title)
    print("wrote", path.with_suffix(".png"))
