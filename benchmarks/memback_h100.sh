#!/usr/bin/env bash
# Issue 13 on one H100 (run from the repository root): the held-memory benchmark
# (~6 min; stops each configuration's trace at 200 s). Run the GPU tests separately:
#   python3 -m pytest -q tests/test_memory_gpu.py tests/test_engine_gpu.py
# Writes benchmarks/results/held_memory_h100_<date>.{json,png,txt}.
set -euo pipefail
day=$(date -u +%F)
out=benchmarks/results/held_memory_h100_$day
timeout 540 python3 benchmarks/held_memory.py --shape llama3-8b \
    --out "$out.json" --plot "$out.png" | tee "$out.txt"
