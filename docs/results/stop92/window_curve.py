"""Exploratory (amendment 2): QuickMergePress's ratio to uncompressed per decoding window on each independent clip,
from the clip's two stop-92 runs (windows 16 and 128: ``decoding_video_<clip>.json``; 4, 8, 32, 64, 256:
``window_curve_<clip>.json``), with the best press of those runs.

    python docs/results/stop92/window_curve.py docs/results/stop92/window_curve.json
"""

import json
import sys

CLIPS = ("tree", "box", "cup")
DEFAULT_WINDOW = 128  # a third of S = 385


def window_of(method: str) -> int | None:
    if method == "quickmerge":
        return DEFAULT_WINDOW
    if method.startswith("quickmerge-w"):
        return int(method.removeprefix("quickmerge-w"))
    return None


def curve(clip: str) -> dict:
    rows, presses = {}, {}
    for name in (f"decoding_video_{clip}", f"window_curve_{clip}"):
        with open(f"docs/results/stop92/{name}.json") as f:
            for r in json.load(f)["summary"]:
                window = window_of(r["method"])
                if window is not None:
                    rows[window] = r["ratio_to_uncompressed"]
                elif r["method"] != "none":
                    presses[r["method"]] = r["ratio_to_uncompressed"]
    best = min(presses, key=presses.get)
    return {"clip": clip, "ratio_to_uncompressed_by_window": dict(sorted(rows.items())),
            "best_window": min(rows, key=rows.get), "best_press": best, "best_press_ratio": presses[best]}


if __name__ == "__main__":
    out = [curve(c) for c in CLIPS]
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
    windows = sorted(out[0]["ratio_to_uncompressed_by_window"])
    print("| clip | " + " | ".join(f"window {w}" for w in windows) + " | best press |")
    print("|---" * (len(windows) + 2) + "|")
    for c in out:
        cells = [f"{c['ratio_to_uncompressed_by_window'][w]:.4f}" for w in windows]
        print(f"| {c['clip']} | " + " | ".join(cells) + f" | {c['best_press']} {c['best_press_ratio']:.4f} |")
