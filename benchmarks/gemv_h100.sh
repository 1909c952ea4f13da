#!/usr/bin/env bash
# Issue 11's small-batch GEMV on one H100, from the repository root, in one call (~4-5
# min; each stage time-limited): the benchmark (GEMV vs cuBLAS at the Llama-3-8B and
# 70B-TP2 linear shapes, M = 1, 2, 4, 8, 16, CUDA-graph replay over rotated weights, %
# of the copy ceiling) with --sweep (the config grid, bounded by SWEEP_S seconds), then
# the GEMV's GPU tests. Writes benchmarks/results/gemv_h100_<date>.{json,txt} and
# ..._pytest.txt. Exits non-zero if a GEMV output was wrong or a test failed.
# Engine-level checks apart (bf16 engines now run the GEMV):
#   python3 -m pytest -q tests/test_engine_gpu.py -k "compile_nothing or bf16"
set -uo pipefail
day=$(date -u +%F)
out=benchmarks/results/gemv_h100_$day
timeout 180 python3 benchmarks/gemv_bench.py --sweep --budget-s "${SWEEP_S:-90}" \
    --out "$out.json" "$@" | tee "$out.txt"
bench=${PIPESTATUS[0]}
timeout 110 python3 -m pytest -q tests/test_gemv_gpu.py tests/test_gemv.py 2>&1 | tee "${out}_pytest.txt"
tests=${PIPESTATUS[0]}
echo "bench exit $bench, tests exit $tests"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
