"""The package's shape: no import cycles (lazy imports included), adapters only through the
registry, a public surface at the top level that imports no optional dependency."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.transformers_free  # run once by ./run.sh test (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent / "quickmerge"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Internal modules imported anywhere in the file (functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _package_of(module: str, packages: set[str]) -> str:
    """The sub-package a module belongs to; the root package's plain modules stand alone."""
    parent = module.rsplit(".", 1)[0]
    return module if module in packages or parent == "quickmerge" else parent


def test_no_import_cycle_between_modules():
    assert _find_cycle(_graph()) is None, f"import cycle: {' -> '.join(_find_cycle(_graph()))}"


def test_no_import_cycle_between_subpackages():
    graph = _graph()
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    collapsed: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = _package_of(module, packages)
        edges = collapsed.setdefault(source, set())
        edges |= {_package_of(t, packages) for t in targets} - {source}
    cycle = _find_cycle(collapsed)
    assert cycle is None, f"sub-package import cycle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_vision_adapters_are_reached_only_through_the_registry():
    graph = _graph()
    adapters = {m for m in graph if m.startswith("quickmerge.vision.adapters.")}
    shared = {"protocol", "residual", "pooling", "instance", "rotary", "unmerge", "multihead"}  # what families share
    family_modules = adapters - {f"quickmerge.vision.adapters.{name}" for name in shared}
    for module, targets in graph.items():
        if module.startswith("quickmerge.vision.adapters"):
            continue
        assert not targets & adapters, f"{module} imports {targets & adapters}; go through quickmerge.vision.adapters"
    assert family_modules <= graph["quickmerge.vision.adapters"], "every adapter module is registered"


def test_public_surface_imports_no_optional_dependency():
    code = (
        "import sys, quickmerge\n"
        "from quickmerge import QuickMergePress, QuickMergeInputPress, ToMeKVPress, RandomEvictionPress, KVPress\n"
        "from quickmerge import patch, unpatch, QuickMergePP\n"
        "heavy = [m for m in ('transformers', 'timm', 'kvpress', 'matplotlib', 'safetensors', 'torchvision',"
        " 'gensim', 'sklearn', 'open_clip') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing quickmerge pulled in {out}"


@pytest.mark.parametrize("name", ["QuickMergePress", "QuickMergeInputPress", "patch", "unpatch", "QuickMergePP"])
def test_top_level_names_are_the_implementations(name):
    import quickmerge

    assert name in quickmerge.__all__ and getattr(quickmerge, name).__module__.startswith("quickmerge.")
