#!/usr/bin/env bash
# Issue 14's heterogeneous mapping experiment on one H100, from the repository root, in
# one call (~2-3 min; at most ~6 min: each part under its own time limit):
#   1. the GPU and CPU tests of host-located chunks (tests/test_memory_location*.py,
#      test_bench_hetero.py) and the virtual tensor's tests on CUDA (what this changed);
#   2. benchmarks/hetero_h100.py: copy bandwidth (pinned buffer vs host-located VMM chunks)
#      and decode over a KV arena with 0/10/25/50% of each request's chunks host-located.
# Writes benchmarks/results/hetero_h100_<date>.{json,txt} and pytest_hetero_gpu_h100_<date>.txt,
# and copies them to $OUT when it is set. Extra flags go to benchmarks/hetero_h100.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
day=$(date -u +%F)
res=benchmarks/results
mkdir -p "$res"
tests=$res/pytest_hetero_gpu_h100_$day.txt
out=$res/hetero_h100_$day
{ "$py" -c 'import torch, cuda.bindings; print("torch", torch.__version__, torch.cuda.get_device_name(0), "cuda.bindings", cuda.bindings.__version__)'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  free -g | head -2; } 2>&1 | tee "$tests"
timeout -k 10 90 "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/test_memory_location_gpu.py tests/test_memory_location.py tests/test_bench_hetero.py \
    tests/test_memory_virtual.py tests/test_memory_cuda.py 2>&1 | tee -a "$tests"
echo "=== pytest exit ${PIPESTATUS[0]}" | tee -a "$tests"
timeout -k 10 250 "$py" benchmarks/hetero_h100.py --out "$out.json" "$@" 2>&1 | tee "$out.txt"
rc=${PIPESTATUS[0]}
echo "=== hetero_h100.py exit $rc" | tee -a "$out.txt"
if [ -n "${OUT:-}" ]; then
    cp -f "$tests" "$out.txt" "$OUT"/ 2>/dev/null
    [ -f "$out.json" ] && cp -f "$out.json" "$OUT"/
fi
exit "$rc"
