#!/usr/bin/env bash
# Issue 15 (weight offload) on one GPU, one stage per call, each within ~8 minutes
# whatever happens (a stage that fails or times out says so in its log):
#
#   bash benchmarks/offload_h100.sh tests [OUTDIR]   GPU tests of the offload (~3-5 min)
#   bash benchmarks/offload_h100.sh 8b [OUTDIR]      bench offload, Llama-3-8B shape (~4 min)
#   bash benchmarks/offload_h100.sh 70b [OUTDIR]     bench offload --big, Llama-3-70B (~5 min)
#
# OUTDIR defaults to $OUT, else benchmarks/results/offload. Files:
#   tests: pytest_offload_gpu.txt
#   8b:    offload_llama3-8b.json, offload_llama3-8b.txt
#   70b:   offload_llama3-70b.json, offload_llama3-70b.txt
set -uo pipefail
cd "$(dirname "$0")/.."
stage_name="${1:?usage: offload_h100.sh tests|8b|70b [OUTDIR]}"
out="${2:-${OUT:-benchmarks/results/offload}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

run() {  # run LOG SECONDS CMD...: one command under a time limit, its output in LOG
    local log=$1 limit=$2
    shift 2
    { "$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
      free -g | head -2; } 2>&1 | tee "$log"
    echo "=== (limit ${limit}s): $*" | tee -a "$log"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$log"
    echo "=== exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$log"
}

case "$stage_name" in
    tests)
        run "$out/pytest_offload_gpu.txt" 470 "$py" -m pytest -q -p no:cacheprovider \
            tests/test_offload_gpu.py tests/test_memory_pinned.py tests/test_offload_engine.py \
            tests/test_offload_prefetch.py tests/test_offload_policy.py tests/test_bench_offload.py
        ;;
    8b)
        run "$out/offload_llama3-8b.txt" 470 "$py" -m vtensor.cli bench offload \
            --shape llama3-8b --json "$out/offload_llama3-8b.json"
        ;;
    70b)
        run "$out/offload_llama3-70b.txt" 470 "$py" -m vtensor.cli bench offload \
            --big --json "$out/offload_llama3-70b.json"
        ;;
    *)
        echo "unknown stage $stage_name: tests, 8b or 70b" >&2
        exit 2
        ;;
esac
