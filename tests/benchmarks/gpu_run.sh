#!/usr/bin/env bash
# Every GPU check and benchmark of promptune in three parts, each writing JSON under $OUT (default ./gpu-out). Run them
# in this order, each as one device call; `step` answers the open question (the SEP step), so it comes first:
#   bash tests/benchmarks/gpu_run.sh step  # training steps: eager and --compile (CUDA graphs) now vs BEFORE_STEP
#   bash tests/benchmarks/gpu_run.sh a     # every command end to end on CUDA (smoke)
#   bash tests/benchmarks/gpu_run.sh b     # predict cold start, predict throughput, data wait; now vs BEFORE
# BEFORE is a folder holding an exported older tree (promptune/ and tests/, a REVISION file naming it), default
# .before (0.1.0: git archive ca3efe7 promptune tests | tar -x -C .before; echo ca3efe7 > .before/REVISION); its own
# benchmarks run on it. BEFORE_STEP (default .before-step, made the same way from 8609e80) is the revision the step
# cases compare with: they drive it through today's Runtime and Trainer, which ca3efe7 lacks (d209f4e or later).
# Carry both folders and .whl. Wheels in .whl (open_clip_torch, timm, ftfy, wcwidth) are installed first when present.
# Each step runs on past another's failure; a step's stderr goes to $OUT/log-<part>.txt. On one H100 (2026-11-26)
# part a's smoke alone took over 200 s (about 15 s a command) and the ViT-B-16 cold start over 150 s: allow about 10
# minutes a part; `step` compiles the SEP step once (its first call, reported), which may take minutes.
set -u
part=${1:-a}
OUT=${OUT:-$PWD/gpu-out}
BEFORE=${BEFORE:-$PWD/.before}
BEFORE_STEP=${BEFORE_STEP:-$PWD/.before-step}
DEVICE=${DEVICE:-cuda} CLIP=${CLIP:-ViT-B-16} VIT=${VIT:-vit_base_patch16_224} STEPS=${STEPS:-10}  # dry runs: smaller
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
log=$OUT/log-$part.txt
bench=tests/benchmarks
step() {  # step NAME OUTFILE COMMAND...: run it, JSON to OUTFILE, a line to the log
  local name=$1 file=$2; shift 2
  local start=$SECONDS
  "$@" > "$OUT/$file" 2>> "$log"
  echo "== $name: rc $? in $((SECONDS - start)) s" | tee -a "$log"
}
old() {  # the same command on the BEFORE tree (its own benchmarks, its own promptune)
  (cd "$BEFORE" && PYTHONPATH=$BEFORE${PYTHONPATH#$PWD} "$@")
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, open_clip, timm; print(torch.__version__, open_clip.__version__, timm.__version__)"
  nproc; } >> "$log" 2>&1

if [ "$part" = step ]; then
  step "tune sep compiled" bench_tune_sep_compile_cuda.json timeout 330 python3 $bench/bench_tune.py --device $DEVICE \
    --method sep --backbone $CLIP --classes 100 --batch 32 --steps $STEPS --warmup 3 --compile
  step "tune clip" bench_tune_clip_cuda.json timeout 120 python3 $bench/bench_tune.py --device $DEVICE --method sep \
    --method coop --backbone $CLIP --classes 100 --batch 32 --steps $STEPS --warmup 3 --before "$BEFORE_STEP" \
    --rounds 1 --no-baselines
  step "tune vit" bench_tune_vit_cuda.json timeout 120 python3 $bench/bench_tune.py --device $DEVICE --method spt \
    --method vpt --backbone $VIT --classes 100 --batch 64 --steps $STEPS --warmup 3 --before "$BEFORE_STEP" --rounds 1
elif [ "$part" = a ]; then
  step "smoke" gpu_smoke_cuda.json timeout 400 python3 $bench/gpu_smoke.py --device $DEVICE \
    --out "$OUT/gpu_smoke_partial.json"
else
  step "cold start" bench_cold_start_cuda.json timeout 300 python3 $bench/bench_cold_start.py --device $DEVICE \
    --method sep --backbone $CLIP --pairs 3 --code "$BEFORE" --code .
  step "predict" bench_predict_cuda.json timeout 90 python3 $bench/bench_predict.py --device $DEVICE --backbone $CLIP \
    --backbone $VIT --batch 128 --classes 10 --classes 1000 --steps $STEPS
  step "predict before" bench_predict_before_cuda.json old timeout 60 python3 tests/benchmarks/bench_predict.py \
    --device $DEVICE --method spt --backbone $VIT --batch 128 --classes 10 --steps $STEPS
  step "data wait" bench_data_wait_cuda.json timeout 150 python3 $bench/bench_tune.py --data-wait --device $DEVICE \
    --method spt --method sep --backbone $CLIP --backbone $VIT --batch 32 --epochs 3 --images-per-class 64
  step "data wait before" bench_data_wait_before_cuda.json old timeout 80 python3 tests/benchmarks/bench_tune.py \
    --data-wait --device $DEVICE --method spt --backbone $VIT --batch 32 --epochs 3 --images-per-class 64
fi
