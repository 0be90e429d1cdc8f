"""Run the tests that hook into transformers against each of its 5.x releases.

The extras allow ``transformers>=5.0``; ``./run.sh test`` runs the suite on the pinned release and on
the newest. This script covers the releases between: for each one it unpacks the wheel (no
dependencies) into a cache, puts it first on ``PYTHONPATH`` in whichever of ``.venv`` /
``.venv-newest`` has the ``huggingface_hub`` and ``tokenizers`` it asks for, runs the given tests and
writes their counts and failures to a JSON file, one release at a time (a killed run resumes).

    .venv/bin/python .ci/transformers_releases.py                 # the last patch of every 5.x minor
    .venv/bin/python .ci/transformers_releases.py 5.3.0 5.4.0     # just these
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
ENVS = (ROOT / ".venv", ROOT / ".venv-newest")
DEPENDENCIES = ("huggingface-hub", "tokenizers", "safetensors")


def published_releases() -> list[str]:
    """The last patch release of every transformers 5.x minor on the package index."""
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"],
                         capture_output=True, text=True, check=True).stdout
    listed = out.split("Available versions:")[1].splitlines()[0]
    versions = [Version(v.strip()) for v in listed.split(",")]
    last: dict[tuple[int, int], Version] = {}
    for v in versions:
        if v.major == 5 and not v.is_prerelease and v > last.get((v.major, v.minor), Version("0")):
            last[(v.major, v.minor)] = v
    return [str(last[k]) for k in sorted(last)]


def unpacked(version: str, cache: Path) -> Path:
    """Directory holding transformers ``version`` unpacked from its wheel (downloaded once)."""
    target = cache / f"transformers-{version}"
    if (target / "transformers").is_dir():
        return target
    wheels = cache / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                    f"transformers=={version}"], check=True)
    (wheel,) = wheels.glob(f"transformers-{version}-*.whl")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        zipfile.ZipFile(wheel).extractall(tmp)
        os.replace(tmp, target)
    return target


def requirements(site: Path) -> list[Requirement]:
    (meta,) = site.glob("transformers-*.dist-info/METADATA")
    headers = Parser().parsestr(meta.read_text())
    reqs = [Requirement(r) for r in headers.get_all("Requires-Dist", [])]
    return [r for r in reqs if r.name.lower() in DEPENDENCIES and r.marker is None]


def installed(env: Path, names: tuple[str, ...]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys; "
            "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))")
    out = subprocess.run([str(env / "bin/python"), "-c", code, *names],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def environment_for(site: Path) -> Path:
    """The first of ``ENVS`` whose dependencies satisfy the release's requirements."""
    reqs = requirements(site)
    for env in ENVS:
        have = installed(env, tuple(r.name for r in reqs))
        if all(r.specifier.contains(have[r.name], prereleases=True) for r in reqs):
            return env
    raise RuntimeError(f"no environment in {[str(e) for e in ENVS]} satisfies {[str(r) for r in reqs]}")


def run_tests(env: Path, site: Path, tests: list[str], report: Path) -> dict:
    environ = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", USE_HUB_KERNELS="NO",
                   TOKENIZERS_PARALLELISM="false")
    seen = subprocess.run([str(env / "bin/python"), "-c", "import transformers; print(transformers.__version__)"],
                          env=environ, capture_output=True, text=True, check=True).stdout.strip()
    start = time.perf_counter()
    proc = subprocess.run([str(env / "bin/python"), "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={report}", *tests], cwd=ROOT, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    suite = ET.parse(report).getroot().find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    return {"imported": seen, "environment": env.name, "exit_code": proc.returncode, "seconds": round(seconds),
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "skipped": counts["skipped"], "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="*", help="releases to test (default: the last patch of every 5.x minor)")
    parser.add_argument("--tests", nargs="+", default=["tests/vision/adapters", "tests/text"])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "quickmerge-transformers")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/compat/transformers_releases.json")
    args = parser.parse_args()
    for env in ENVS:
        if not (env / "bin/python").exists():
            parser.error(f"{env} is missing: run ./run.sh test once first (it builds both environments)")
    versions = args.versions or published_releases()
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out.exists() else {"tests": args.tests, "releases": {}}
    if results["tests"] != args.tests:
        parser.error(f"{args.out} holds results for tests {results['tests']}; pass --out for another set")
    for i, version in enumerate(versions, 1):
        if version in results["releases"]:
            print(f"[{i}/{len(versions)}] transformers {version}: done before, kept", flush=True)
            continue
        site = unpacked(version, args.cache)
        env = environment_for(site)
        row = run_tests(env, site, args.tests, args.cache / f"report-{version}.xml")
        if row["imported"] != version:
            raise RuntimeError(f"asked for transformers {version}, the tests imported {row['imported']}")
        results["releases"][version] = row
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"[{i}/{len(versions)}] transformers {version} in {env.name}: {row['passed']} passed, "
              f"{row['skipped']} skipped, {len(row['failed'])} failed ({row['seconds']} s)", flush=True)
        for name in row["failed"]:
            print(f"    FAILED {name}", flush=True)


if __name__ == "__main__":
    main()
