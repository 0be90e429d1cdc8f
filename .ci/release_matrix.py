"""Run the tests that hook into an integration's library against each release the extras allow.

``./run.sh test`` runs the suite on the pinned releases and on the newest transformers. This script covers the
releases between, for transformers (the last patch of every 5.x minor), timm and OpenCLIP (every release from the
floor in pyproject.toml): for each one it unpacks the wheel (no dependencies) into a cache, puts it first on
``PYTHONPATH`` in whichever of ``.venv`` / ``.venv-newest`` has the dependencies it asks for (or misses fewest,
each one it misses installed beside it without dependencies: an overlay, named in the results), runs the tests that
use the library and writes their counts and failures to ``docs/results/compat/<package>_releases.json``, one
release at a time (a killed run resumes there).

    .venv/bin/python .ci/release_matrix.py transformers              # every 5.x minor, ~2-4 min each on 2 cores
    .venv/bin/python .ci/release_matrix.py transformers 5.3.0 5.4.0  # just these
    .venv/bin/python .ci/release_matrix.py timm
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
ENVS = (ROOT / ".venv", ROOT / ".venv-newest")


@dataclass(frozen=True)
class Package:
    module: str
    floor: str  # the extras' lower bound
    every_minor: bool  # test the last patch of each minor (else every release)
    dependencies: tuple[str, ...]  # whose requirements pick the environment
    tests: tuple[str, ...]


PACKAGES = {
    "transformers": Package("transformers", "5.0", True, ("huggingface-hub", "tokenizers", "safetensors"),
                            ("tests/vision/adapters", "tests/text")),
    "timm": Package("timm", "1.0.16", False, ("huggingface-hub", "safetensors", "torch", "torchvision"),
                    ("tests/vision/adapters/test_timm_vit.py", "tests/vision/adapters/test_timm_eva.py",
                     "tests/vision/adapters/test_timm_naflex.py",
                     "tests/vision/adapters/test_residual.py", "tests/vision/test_patch_unmerge.py",
                     "tests/test_compile_guard.py", "tests/pretrained/test_fashion_vit.py")),
    "open_clip_torch": Package("open_clip", "3.0", False, ("huggingface-hub", "timm", "torch", "torchvision"),
                               ("tests/vision/adapters/test_openclip_vit.py", "tests/vision/adapters/test_multihead.py",
                                "tests/vision/adapters/test_residual.py", "tests/vision/test_patch_unmerge.py")),
}


def published_releases(name: str, package: Package) -> list[str]:
    """Releases of ``name`` on the package index from the floor on (the last patch of each minor, if so chosen)."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", name],
                         capture_output=True, text=True, check=True).stdout
    listed = out.split("Available versions:")[1].splitlines()[0]
    versions = [v for v in map(Version, (x.strip() for x in listed.split(",")))
                if v >= Version(package.floor) and not v.is_prerelease]
    if not package.every_minor:
        return [str(v) for v in sorted(versions)]
    last: dict[tuple[int, int], Version] = {}
    for v in versions:
        last[(v.major, v.minor)] = max(v, last.get((v.major, v.minor), v))
    return [str(last[k]) for k in sorted(last)]


def unpacked(name: str, version: str, cache: Path) -> Path:
    """Directory holding release ``version`` of ``name`` unpacked from its wheel (downloaded once)."""
    target = cache / f"{name}-{version}"
    if target.is_dir():
        return target
    wheels = cache / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                    f"{name}=={version}"], check=True)
    (wheel,) = wheels.glob(f"{name.replace('-', '_')}-{version}-*.whl")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        zipfile.ZipFile(wheel).extractall(tmp)
        os.replace(tmp, target)
    return target


def requirements(site: Path, dependencies: tuple[str, ...]) -> list[Requirement]:
    """The release's requirements on ``dependencies`` (its wheel's metadata; optional extras left out)."""
    (meta,) = site.glob("*.dist-info/METADATA")
    headers = Parser().parsestr(meta.read_text())
    reqs = [Requirement(r) for r in headers.get_all("Requires-Dist", [])]
    return [r for r in reqs if r.name.lower().replace("_", "-") in dependencies
            and (r.marker is None or r.marker.evaluate({"extra": ""}))]


def installed(env: Path, names: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([str(env / "bin/python"), "-c", code, *names],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def environment_for(site: Path, dependencies: tuple[str, ...], cache: Path) -> tuple[Path, list[Path]]:
    """The first of ``ENVS`` whose dependencies satisfy the release's requirements, with no overlays; else the one
    that misses fewest, with each requirement it misses met by an overlay (:func:`overlay`)."""
    reqs = requirements(site, dependencies)
    closest = []
    for env in ENVS:
        have = installed(env, tuple(r.name for r in reqs))
        missing = [r for r in reqs if not r.specifier.contains(have[r.name], prereleases=True)]
        if not missing:
            return env, []
        closest.append((len(missing), env, missing))
    _, env, missing = min(closest, key=lambda option: option[0])
    return env, [overlay(env, r, cache) for r in missing]


def overlay(env: Path, requirement: Requirement, cache: Path) -> Path:
    """The newest release meeting ``requirement`` installed for ``env``'s interpreter into a directory of its own
    (no dependencies: the environment's own must do), to put on ``PYTHONPATH`` after the release under test.
    Raises RuntimeError if the package index has none."""
    target = cache / re.sub(r"[^\w.]+", "_", f"overlay-{env.name}-{requirement.name}{requirement.specifier}")
    if target.is_dir():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        done = subprocess.run([str(env / "bin/python"), "-m", "pip", "install", "-q", "--no-deps", "--target", tmp,
                               str(requirement)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"no release of {requirement} installs in {env}: {done.stderr.strip()[-300:]}")
        os.replace(tmp, target)
    return target


def overlaid(overlays: list[Path]) -> str:
    """``name version`` of what each overlay directory holds, for the results."""
    return ", ".join(meta.name.removesuffix(".dist-info").replace("-", " ", 1)
                     for path in overlays for meta in path.glob("*.dist-info"))


def run_tests(env: Path, site: Path, overlays: list[Path], module: str, tests: list[str], report: Path) -> dict:
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, [site, *overlays])), HF_HUB_OFFLINE="1",
                   USE_HUB_KERNELS="NO",
                   TOKENIZERS_PARALLELISM="false")
    seen = subprocess.run([str(env / "bin/python"), "-c", f"import {module}; print({module}.__version__)"],
                          env=environ, capture_output=True, text=True, check=True).stdout.strip()
    start = time.perf_counter()
    proc = subprocess.run([str(env / "bin/python"), "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *tests], cwd=ROOT, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    suite = ET.parse(report).getroot().find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    return {"imported": seen, "environment": env.name + (f" + {overlaid(overlays)}" if overlays else ""),
            "exit_code": proc.returncode, "seconds": round(seconds),
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "skipped": counts["skipped"], "failed": failed}


def report(results: dict, package: str) -> str:
    """A Markdown table of ``results`` (one row per release), failures named below it."""
    lines = [f"| {package} | environment | passed | skipped | failed |", "|---|---|---:|---:|---:|"]
    failures = []
    for version, row in sorted(results["releases"].items(), key=lambda kv: Version(kv[0])):
        if row["environment"] is None:
            lines.append(f"| {version} | none here | | | not run: {row['not_run'][-200:]} |")
            continue
        lines.append(f"| {version} | `{row['environment']}` | {row['passed']} | {row['skipped']} | "
                     f"{len(row['failed'])} |")
        tests = Counter(name.split("[")[0] for name in row["failed"])  # parametrized cases counted per test
        failures += [f"- {version}: `{name}`" + (f" ({n} cases)" if n > 1 else "") for name, n in tests.items()]
    return "\n".join(lines + (["", "Failed:", *failures] if failures else [])) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", choices=list(PACKAGES))
    parser.add_argument("versions", nargs="*", help="releases to test (default: every one from the floor, or the "
                        "last patch of each minor for transformers)")
    parser.add_argument("--tests", nargs="+", default=None, help="default: the tests that use the package")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "quickmerge-releases")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: docs/results/compat/<package>_releases.json")
    parser.add_argument("--report", action="store_true", help="print the results as a Markdown table; run nothing")
    args = parser.parse_args()
    package = PACKAGES[args.package]
    args.tests = args.tests or list(package.tests)
    args.out = args.out or ROOT / f"docs/results/compat/{args.package}_releases.json"
    if args.report:
        print(report(json.loads(args.out.read_text()), args.package), end="")
        return
    for env in ENVS:
        if not (env / "bin/python").exists():
            parser.error(f"{env} is missing: run ./run.sh test once first (it builds both environments)")
    versions = args.versions or published_releases(args.package, package)
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"tests": args.tests, "releases": {}}
    if results["tests"] != args.tests:
        parser.error(f"{args.out} holds results for tests {results['tests']}; pass --out for another set")
    for i, version in enumerate(versions, 1):
        if version in results["releases"]:
            print(f"[{i}/{len(versions)}] {args.package} {version}: done before, kept", flush=True)
            continue
        site = unpacked(args.package, version, args.cache)
        try:
            env, overlays = environment_for(site, package.dependencies, args.cache)
        except RuntimeError as error:  # recorded, not run: a requirement the package index cannot meet here
            results["releases"][version] = {"environment": None, "not_run": str(error)}
            args.out.write_text(json.dumps(results, indent=1) + "\n")
            print(f"[{i}/{len(versions)}] {args.package} {version}: not run, {error}", flush=True)
            continue
        row = run_tests(env, site, overlays, package.module, args.tests,
                        args.cache / f"report-{args.out.stem}-{version}.xml")
        if row["imported"] != version:
            raise RuntimeError(f"asked for {args.package} {version}, the tests imported {row['imported']}")
        results["releases"][version] = row
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"[{i}/{len(versions)}] {args.package} {version} in {row['environment']}: {row['passed']} passed, "
              f"{row['skipped']} skipped, {len(row['failed'])} failed ({row['seconds']} s)", flush=True)
        for name in row["failed"]:
            print(f"    FAILED {name}", flush=True)


if __name__ == "__main__":
    main()
