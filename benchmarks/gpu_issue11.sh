#!/usr/bin/env bash
# Issue 11 on one CUDA GPU, in one go (about 8 minutes on an H200):
#   1. a speed probe (one epoch) that sizes the schedule to the time given (REF_SECONDS, default 200),
#   2. the reference ViT from scratch (teacher TEACHER_EPOCHS epochs, then the sized number of epochs),
#   3. for each seed in SEEDS: merge-aware fine-tuning at r = 40 with QuickMerge++ and ToMe-style merging
#      and the control without merging, then the per-image hits of benchmarks/vision_finetune.py,
#   4. `quickmerge eval vision` on the GPU (batch 2048): accuracy and GPU throughput per setting.
# A reference already in results/fashion_vit_gpu is reused (stages 1-2 skipped).
# Every stage's outputs are packed into $OUT as soon as they exist. Speed-ups for the tables in
# BENCHMARKS.md are measured on the 2-core CPU (`quickmerge eval vision`), not here.
#
#   OUT=results/gpu QUICKMERGE_FASHION_MNIST=/usr/share/datasets/fashion-mnist bash benchmarks/gpu_issue11.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export QUICKMERGE_FASHION_MNIST=${QUICKMERGE_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
OUT=${OUT:-results/gpu}
PY=${PY:-python3}
REF_SECONDS=${REF_SECONDS:-200}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
SEEDS=${SEEDS:-0 1 2}
mkdir -p "$OUT" results
log() { echo "[$(date +%T)] $*"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())" \
    || exit 1

if [ -f results/fashion_vit_gpu/config.json ]; then
    log "reference already trained (results/fashion_vit_gpu): skipping stages 1-2"
else
log "speed probe: one epoch, no teacher"
$PY -m quickmerge train vision --epochs 1 --teacher-epochs 0 --threads 8 --fresh --out results/gpu_probe || exit 1
EPOCH_S=$($PY -c "import json; print(json.load(open('results/gpu_probe/config.json'))['training']['seconds'])")
EPOCHS=$($PY -c "print(max(10, min(60, int($REF_SECONDS / (1.3 * $EPOCH_S)))))")
log "one epoch took $EPOCH_S s: training the reference for $EPOCHS epochs"

$PY -m quickmerge train vision --epochs "$EPOCHS" --teacher-epochs "$TEACHER_EPOCHS" --threads 8 --fresh \
    --out results/fashion_vit_gpu || exit 1
tar czf "$OUT/ref.tgz" results/fashion_vit_gpu
fi
# the new model becomes this copy's shipped reference, which fine-tuning and the evaluations read
cp results/fashion_vit_gpu/{model.safetensors,config.json,train_log.json} quickmerge/assets/fashion_vit/
rm -f quickmerge/assets/fashion_vit/train_log_stage1.json

finetune() {  # seed
    local s=$1
    log "fine-tuning, seed $s"
    $PY -m quickmerge train vision --finetune quickmerge/assets/fashion_vit --method quickmerge --r-per-block 40 \
        --seed "$s" --threads 8 --fresh --out "results/ft_s${s}_qm" || return 1
    $PY -m quickmerge train vision --finetune quickmerge/assets/fashion_vit --method tome --r-per-block 40 \
        --seed "$s" --threads 8 --fresh --out "results/ft_s${s}_tome" || return 1
    $PY -m quickmerge train vision --finetune quickmerge/assets/fashion_vit --method tome --r-per-block 0 \
        --seed "$s" --threads 8 --fresh --out "results/ft_s${s}_none" || return 1
    $PY benchmarks/vision_finetune.py --quickmerge "results/ft_s${s}_qm" --tome "results/ft_s${s}_tome" \
        --control "results/ft_s${s}_none" --r 40 48 --device cuda --threads 8 --hits "results/ft_s${s}_hits.json" \
        || return 1
    tar czf "$OUT/ft_s$s.tgz" results/ft_s"${s}"_*
}

set -- $SEEDS
finetune "$1" || exit 1
shift

log "eval vision on the GPU"
$PY -m quickmerge eval vision --batch-size 2048 --threads 8 --fresh --out results/vision_gpu \
    && cp results/vision_gpu.json results/vision_gpu.png "$OUT/"

for s in "$@"; do finetune "$s"; done
log done
