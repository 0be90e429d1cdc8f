#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one call (stop 63). Each stage has a time limit; about 8 minutes on an H200
# without the compiled cases, which close it:
#   1. tests/test_devices.py: every public path on the GPU against the CPU (fp32, fp16, bf16; torch.compile last);
#   2. `quickmerge eval image` / `eval video` on the GPU with our presses: per-example NLL, compared afterwards with
#      the same commands on the CPU (benchmarks/compare_runs.py CPU.json GPU.json --json DIFF.json; the CPU runs at
#      stop 65's code, every selection breaking exact ties by position: docs/results/gpu/{image,video}_cpu_s65.json);
#   3. `quickmerge eval vision` on the GPU, fp32 then bf16 (batch 2048): accuracy and GPU throughput per setting;
#   4. benchmarks/vision_speed.py --device cuda: the merge step's share of a block (batch 256 and 2048);
#   5. benchmarks/video_input_prefill.py --device cuda: the input-side video merge's prefill speed-up, fp32 and bf16;
#   6. benchmarks/vit_speed.py: ViT-B/16 (random weights) patched vs unpatched, fp32 and bf16 (added after stop 63's
#      run, which had no time for it).
# Each stage has its own time limit, its whole output goes to $OUT/log.txt and its results to $OUT as soon as it
# ends (at most 8 files come back).
# The data travel in .gpudata (ignored by git; name it in the call's carry):
#   mkdir -p .gpudata/fashion .gpudata/video && cp /usr/share/datasets/fashion-mnist/*.gz .gpudata/fashion/ &&
#   cp /usr/share/doc/opencv-doc/examples/data/{vtest,Megamind}.avi .gpudata/video/
#   OUT=results/gpu bash benchmarks/gpu_checks.sh      # IMAGES=512 EXAMPLES=4 DEV=cpu: a dry run on the CPU;
#   COMPILED=0 leaves out the compiled cases (~4 minutes on an H200): the whole call then fits in ~5 minutes
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
export QUICKMERGE_FASHION_MNIST=${QUICKMERGE_FASHION_MNIST:-$PWD/.gpudata/fashion}
export QUICKMERGE_VIDEO_DIR=${QUICKMERGE_VIDEO_DIR:-$PWD/.gpudata/video}
OUT=${OUT:-results/gpu}
PY=${PY:-python3}
IMAGES=${IMAGES:-10000}
EXAMPLES=${EXAMPLES:-40}
DEV=${DEV:-cuda}  # DEV=cpu for the dry run
R=results/gpu_work
mkdir -p "$OUT" "$R"
log() { echo "[$(date +%T)] $*"; }
stage() {  # seconds, name, command...: a stage that overruns is stopped and reported, the next one runs
    local limit=$1 name=$2
    shift 2
    log "stage $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$R/$name.log" 2>&1
    local rc=$?
    grep -v "it/s\]\|setting/s" "$R/$name.log" | tail -n 25  # the reply keeps only the end of the output
    cat "$R/$name.log" >> "$OUT/log.txt"
    log "stage $name: rc=$rc"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
$PY -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')"

# compiling the patched ViT takes ~110 s on an H200 (stop 63), so the compiled cases run last, on their own
stage 90 devices $PY -m pytest tests/test_devices.py tests/eval/test_timing.py -k "not compiles" -v -o addopts="" \
    -p no:cacheprovider --timeout 60 --durations=5

for modality in image video; do
    methods="quickmerge random"
    [ $modality = image ] && methods="$methods quickmerge-columns quickmerge-replay-row"
    [ $modality = video ] && methods="$methods quickmerge-time quickmerge-input-time"
    stage 60 "eval-$modality" $PY -m quickmerge eval $modality --examples "$EXAMPLES" --ratios 0.5 0.75 \
        --methods $methods --threads 8 --fresh --out "$R/${modality}_gpu" \
        && cp "$R/${modality}_gpu.json" "$OUT/"
done

stage 100 vision-fp32 $PY -m quickmerge eval vision --images "$IMAGES" --batch-size 2048 --threads 8 --fresh \
    --out "$R/vision_gpu_fp32" && cp "$R/vision_gpu_fp32.json" "$OUT/"

for batch in 256 2048; do
    stage 30 "merge-step-$batch" $PY benchmarks/vision_speed.py --device "$DEV" --batch $batch --repeats 30 --threads 8 \
        --json "$R/vision_speed_gpu_$batch.json"
done
$PY -c "import json, sys; json.dump({b: json.load(open(f'$R/vision_speed_gpu_{b}.json')) for b in ('256', '2048')},
    open('$OUT/vision_speed_gpu.json', 'w'), indent=2)" || true

for dtype in float32 bfloat16; do
    stage 40 "video-prefill-$dtype" $PY benchmarks/video_input_prefill.py --device "$DEV" --dtype $dtype --rounds 15 \
        --threads 8 --out "$R/video_input_prefill_gpu_$dtype.json"
done
$PY -c "import json; json.dump({d: json.load(open(f'$R/video_input_prefill_gpu_{d}.json')) for d in ('float32',
    'bfloat16')}, open('$OUT/video_input_prefill_gpu.json', 'w'), indent=2)" || true

stage 80 vision-bf16 $PY -m quickmerge eval vision --images "$IMAGES" --batch-size 2048 --threads 8 --fresh \
    --dtype bfloat16 --timing-rounds 9 --out "$R/vision_gpu_bf16" && cp "$R/vision_gpu_bf16.json" "$OUT/"
for dtype in float32 bfloat16; do  # does merging pay on a GPU for a ViT-B (ToMe's r = 8, 16)? random weights
    stage 60 "vit-b-$dtype" $PY benchmarks/vit_speed.py --device "$DEV" --dtype $dtype --batch 256 --r 8 16 \
        --threads 8 --json "$R/vit_b_speed_$dtype.json"
done
$PY -c "import json; json.dump({d: json.load(open(f'$R/vit_b_speed_{d}.json')) for d in ('float32', 'bfloat16')},
    open('$OUT/vit_b_speed_gpu.json', 'w'), indent=2)" || true

[ "${COMPILED:-1}" = 1 ] && stage 280 devices-compiled $PY -m pytest tests/test_devices.py -k compiles -v \
    -o addopts="" -p no:cacheprovider --timeout 150 --durations=5
ls -la "$OUT"
log done
