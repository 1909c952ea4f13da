#!/usr/bin/env bash
# Issue 16's tensor-parallel measurements on two GPUs (nvidia-h200-x2), in one command
# that ends within ~8 minutes whatever happens (each stage has its own time limit; a
# stage that fails or times out leaves its JSON missing, the report says so).
#
#   bash benchmarks/tp_h200x2.sh [OUTDIR]      (default: $OUT, else benchmarks/results/tp)
#
# Stages, each a fresh process (a clean GPU and NCCL state for each engine):
#   1. vtensor bench collectives: NCCL all-reduce bus bandwidth, and one decode step's
#      collectives (8B and 70B shapes, batches 1/16/64/256) replayed from a CUDA graph
#   2. Llama-3-8B shape, TP=1: decode steps at 1/16/64/256 vs floor, offline 1024/128
#   3. the same at TP=2
#   4. Llama-3-70B shape (random bf16 weights built on the GPUs), TP=2: decode steps at
#      1/16/64 vs floor (goal: <= 1.3x at 64), offline 1024/128
# then python -m vtensor.bench.tp_report OUTDIR > OUTDIR/tp_report.txt.
# Files: collectives.json, offline_{8b_tp1,8b_tp2,70b_tp2}.json, tp_log.txt, tp_report.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results/tp}}"
mkdir -p "$out"
log="$out/tp_log.txt"
: >"$log"
# NVLink multicast stays off (the shared machine's rule; the engine sets these too).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

stage() {  # stage NAME SECONDS ARGS...: one `vtensor` command under a time limit
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): vtensor $*" | tee -a "$log"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$py" -m vtensor.cli "$@" 2>&1 | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}

{ "$py" -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count())'
  nvidia-smi topo -m || true; } 2>&1 | tee -a "$log"

common=(--num-prompts 300 --input-len 1024 --output-len 128 --decode-ctx 1024
        --decode-steps 24 --no-decode-sync --no-hf-peer)
stage collectives 60 bench collectives -tp 2 --shapes llama3-8b,llama3-70b \
    --batches 1,16,64,256 --json "$out/collectives.json"
stage 8b_tp1 140 bench offline --shape llama3-8b "${common[@]}" \
    --decode-batches 1,16,64,256 --json "$out/offline_8b_tp1.json"
stage 8b_tp2 110 bench offline --shape llama3-8b -tp 2 "${common[@]}" \
    --decode-batches 1,16,64,256 --json "$out/offline_8b_tp2.json"
stage 70b_tp2 170 bench offline --shape llama3-70b -tp 2 "${common[@]}" --num-prompts 128 \
    --decode-batches 1,16,64 --json "$out/offline_70b_tp2.json"

"$py" -m vtensor.bench.tp_report "$out" | tee "$out/tp_report.txt"
