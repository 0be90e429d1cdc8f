"""Which tests ./run.sh test's second run needs: ``python tests/newest_scope.py NEWEST_SITE_PACKAGES``.

``.venv-newest`` is ``.venv`` plus what its own site-packages holds: the newest transformers and whatever of its
dependencies pip upgraded or added. Tests marked ``transformers_free`` (tests/conftest.py) meet nothing of
transformers, tokenizers, huggingface_hub's downloads or kernels, so when the second environment overrides nothing
else that ``.venv`` has, the run leaves them out: this prints ``--transformers-only``. When it overrides another
package ``.venv`` has (a newer NumPy or safetensors, say), it prints nothing (the whole suite runs again) and names
that package on stderr. Run it with ``.venv``'s interpreter: its installed distributions are the baseline.
"""

from __future__ import annotations

import sys
from importlib import metadata

# transformers and the packages only it reaches in the marked tests (timm and OpenCLIP import huggingface_hub, and
# use it only to download weights, which no test does; typer serves only huggingface_hub's and transformers' own
# command lines, and a marked test that imports it fails: tests.launch.WATCHED); pip and setuptools belong to the
# environment itself
FAMILY = {"transformers", "tokenizers", "huggingface-hub", "kernels", "typer", "pip", "setuptools"}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def other_overrides(newest_site: str) -> list[str]:
    """Distributions in ``newest_site`` that this environment also has, other than ``FAMILY``."""
    ours = {canonical(d.metadata["Name"]) for d in metadata.distributions()}
    theirs = {canonical(d.metadata["Name"]) for d in metadata.distributions(path=[newest_site])}
    return sorted((theirs & ours) - FAMILY)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tests/newest_scope.py NEWEST_SITE_PACKAGES", file=sys.stderr)
        return 2
    others = other_overrides(argv[0])
    if others:
        print(f"[run.sh] .venv-newest also overrides {', '.join(others)}: the whole suite runs there again",
              file=sys.stderr)
    else:
        print("[run.sh] .venv-newest overrides transformers' family alone: the tests marked transformers_free ran "
              "once, above (--transformers-only)", file=sys.stderr)
        print("--transformers-only")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
