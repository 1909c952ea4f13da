#!/usr/bin/env bash
# Issue 16's decode all-reduce: NCCL against --all-reduce symm-mem (PyTorch's
# symmetric-memory one-shot all-reduce, NVLink P2P loads, no multicast), on two GPUs
# (nvidia-h200-x2), in one command that ends within ~9 minutes whatever happens: every
# part runs under `timeout`; a part that fails or times out leaves its file missing and
# the report says so.
#
#   bash benchmarks/tp_allreduce_h200x2.sh OUTDIR      (default: $OUT)
#
# Parts (limits in seconds; 525 in all, plus the report):
#   1. benchmarks/allreduce_candidates.py: each candidate's time per all-reduce of a
#      decode step's [batch, hidden] bf16 inside CUDA graphs, outputs checked   (70)
#   2. the multi-GPU tests: tests/test_all_reduce_gpu.py (the symm path against an
#      fp32 reference sum, TP=2 fp32 greedy with it == TP=1), then
#      tests/test_tensor_parallel_gpu.py (NCCL, unchanged)                       (200)
#   3. vtensor bench collectives: one decode step's collectives from a graph, NCCL and
#      symm-mem                                                                  (2 x 35)
#   4. Llama-3-70B shape (random bf16 weights) TP=2 decode steps at batches 1/16/64
#      vs the floor, NCCL and symm-mem (no throughput run: time)                (2 x 90)
# then python -m vtensor.bench.allreduce_report OUTDIR > OUTDIR/allreduce_report.txt.
# Files: allreduce_candidates.{json,txt}, pytest_gpu.txt, collectives_{nccl,symm}.json,
# offline_70b_tp2_{nccl,symm}.json, log.txt, allreduce_report.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:?give OUTDIR}}"
mkdir -p "$out"
log="$out/log.txt"
: >"$log"
# NVLink multicast stays off in every process (the shared machine's rule; the engine and
# the scripts set these too). Never multimem: the one-shot kernel uses P2P loads only.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

part() {  # part NAME SECONDS FILE COMMAND...: COMMAND under a time limit, output to FILE
    local name=$1 limit=$2 file=$3
    shift 3
    echo "=== $name (limit ${limit}s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$file" | tee -a "$log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}

{ "$py" -c 'import torch; print("torch", torch.__version__, "gpus", torch.cuda.device_count(),
    "symm one-shot op:", hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"))'
  nvidia-smi topo -m || true; } 2>&1 | tee -a "$log"

part candidates 70 "$out/allreduce_candidates.txt" \
    "$py" benchmarks/allreduce_candidates.py --json "$out/allreduce_candidates.json"
part gpu_tests 200 "$out/pytest_gpu.txt" "$py" -m pytest -q -rA --durations=0 \
    tests/test_all_reduce_gpu.py tests/test_tensor_parallel_gpu.py
for run in nccl symm; do
    flag=(--all-reduce nccl)
    [ "$run" = symm ] && flag=(--all-reduce symm-mem)
    part "collectives_$run" 35 "$out/collectives_$run.txt" "$py" -m vtensor.cli \
        bench collectives -tp 2 --shapes llama3-8b,llama3-70b --batches 1,16,64,256 \
        --sizes-mib 1,256 "${flag[@]}" --json "$out/collectives_$run.json"
done
for run in nccl symm; do
    flag=(--all-reduce nccl)
    [ "$run" = symm ] && flag=(--all-reduce symm-mem)
    part "70b_tp2_$run" 90 "$out/offline_70b_tp2_$run.txt" "$py" -m vtensor.cli \
        bench offline --shape llama3-70b -tp 2 --decode-ctx 1024 --decode-steps 24 \
        --no-decode-sync --no-hf-peer --skip-throughput --decode-batches 1,16,64 \
        "${flag[@]}" --json "$out/offline_70b_tp2_$run.json"
done

"$py" -m vtensor.bench.allreduce_report "$out" | tee "$out/allreduce_report.txt"
