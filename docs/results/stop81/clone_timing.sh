#!/bin/bash
# usage: clone_timing.sh COMMIT TAG [demo]  (run in the repository; logs under $LOGS, default /tmp): a fresh clone of
# COMMIT runs ./run.sh test (and ./run.sh demo) with an empty inductor cache, as a clean CI machine would
set -u
c=$1; tag=$2
d=$(mktemp -d /tmp/s81_clone_$tag.XXXX); echo $d > ${LOGS:-/tmp}/clone_$tag.dir
git clone -q ${REPO:-$(pwd)} $d/repo && cd $d/repo && git checkout -q $c
export TORCHINDUCTOR_CACHE_DIR=$d/inductor
start=$(date +%s)
./run.sh test > ${LOGS:-/tmp}/clone_${tag}_test.log 2>&1; echo "rc=$? seconds=$(( $(date +%s) - start ))" >> ${LOGS:-/tmp}/clone_${tag}_test.log
if [ "${3:-}" = demo ]; then
  start=$(date +%s)
  ./run.sh demo > ${LOGS:-/tmp}/clone_${tag}_demo.log 2>&1; echo "rc=$? seconds=$(( $(date +%s) - start ))" >> ${LOGS:-/tmp}/clone_${tag}_demo.log
fi
