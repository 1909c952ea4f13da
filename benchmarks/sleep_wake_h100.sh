#!/usr/bin/env bash
# Issue 13 on one H100 (run from the repository root): sleep/wake of a Llama-3-8B-shape
# engine (random bf16 weights), against the pinned copy ceiling (~2 min). GPU tests apart:
#   python3 -m pytest -q tests/test_sleep_gpu.py tests/test_weight_region.py
# Writes benchmarks/results/sleep_wake_h100_<date>.{json,txt}.
set -euo pipefail
day=$(date -u +%F)
out=benchmarks/results/sleep_wake_h100_$day
timeout 300 python3 benchmarks/sleep_wake.py --shape llama3-8b --out "$out.json" | tee "$out.txt"
