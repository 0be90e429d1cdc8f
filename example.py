"""QuickMerge++ on real text: run ``python example.py`` (steps: ``quickmerge/demos/encoder_token_groups.py``).

A real sentence encoder (all-MiniLM-L6-v2) encodes real Wikipedia text; the
entropy of its attention maps across its layers gives token saliency;
QuickMergePP merges the token states to a quarter of their number and reports
which words were merged together and the ratio achieved.
"""

import argparse

from quickmerge.demos.encoder_token_groups import run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=None, help="text to compress (default: a Wikipedia article's opening)")
    parser.add_argument("--keep", type=float, default=0.25, help="share of tokens to keep, in (0, 1]")
    args = parser.parse_args()
    run(args.text, args.keep)
