"""Whether the torchvision classes the ViT adapter hooks changed across the releases the extras allow.

torchvision's wheels carry compiled operators tied to one torch release each, so its releases cannot be swapped under
the pinned torch the way ``release_matrix.py`` swaps timm or transformers. What the adapter depends on is Python
source: this script downloads each torchvision release's wheel (no dependencies), parses the classes the adapter
hooks or builds on (``VisionTransformer``, ``Encoder``, ``EncoderBlock``, ``MLPBlock`` and ``ops.misc.MLP``), and
reports, per release, a digest of each class's code without comments and docstrings, and how it differs from the
pinned release's (annotations aside).

    .venv/bin/python .ci/torchvision_sources.py 0.17.0 0.18.0 ... --out docs/results/compat/torchvision_sources.json
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CLASSES = {"torchvision/models/vision_transformer.py": ("VisionTransformer", "Encoder", "EncoderBlock", "MLPBlock"),
           "torchvision/ops/misc.py": ("MLP",)}


def _without_annotations(node: ast.AST) -> ast.AST:
    """``node`` with every annotation removed (typing spelled ``List`` or ``list`` is not a change the adapter sees)."""
    for n in ast.walk(node):
        if isinstance(n, ast.arg):
            n.annotation = None
        elif isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
            n.returns = None
        elif isinstance(n, ast.AnnAssign):
            n.annotation = ast.Constant(None)
    return node


def class_sources(wheel: Path) -> dict[str, str]:
    """Each hooked class's code (annotations and docstrings dropped) in ``wheel``."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for path, names in CLASSES.items():
            for node in ast.parse(z.read(path).decode()).body:
                if isinstance(node, ast.ClassDef) and node.name in names:
                    for n in ast.walk(node):
                        body = getattr(n, "body", None)
                        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                            n.body = body[1:] or [ast.Pass()]
                    out[node.name] = ast.unparse(_without_annotations(node))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("versions", nargs="+")
    ap.add_argument("--pinned", default="0.29.1")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for version in dict.fromkeys([args.pinned, *args.versions]):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "--platform",
                            "manylinux1_x86_64", "-d", f"{tmp}/{version}", f"torchvision=={version}"], check=True)
            sources[version] = class_sources(next(Path(tmp, version).glob("*.whl")))
    pinned = sources[args.pinned]
    report = {"command": "python .ci/torchvision_sources.py " + " ".join(sys.argv[1:]), "pinned": args.pinned,
              "releases": {}}
    for version, classes in sources.items():
        report["releases"][version] = {
            name: {"digest": hashlib.sha1(code.encode()).hexdigest()[:12],
                   "differs_from_pinned": list(difflib.unified_diff(pinned[name].splitlines(), code.splitlines(),
                                                                    lineterm="", n=0))[2:]}
            for name, code in classes.items()}
        changed = [n for n, c in report["releases"][version].items() if c["differs_from_pinned"]]
        print(version, "same as pinned" if not changed else f"differs in {changed}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
