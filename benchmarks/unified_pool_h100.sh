#!/usr/bin/env bash
# Issue 19 (first slice) on one H100, from the repository root: eLLM's long-context case
# scaled to one GPU (Llama-3.1-8B shape, random bf16 weights, 4 prompts of 120k tokens,
# 256 out, steps of up to 64k tokens), the unified memory pool against the static split
# given exactly the measured workspace of the largest step, in one process (~4-5 min;
# killed at 570 s). Extra flags go to benchmarks/unified_pool.py (e.g. --input-len 65536
# --num-requests 8 for a shorter run).
# Exits non-zero if a request was lost, the unified pool broke its budget, its KV never
# borrowed from the workspace, or it ran a smaller batch than the static split.
# GPU tests apart:  python3 -m pytest -q tests/test_elastic_gpu.py
# Writes benchmarks/results/unified_pool_h100_<date>.{json,txt}.
set -euo pipefail
day=$(date -u +%F)
out=benchmarks/results/unified_pool_h100_$day
timeout 570 python3 benchmarks/unified_pool.py --out "$out.json" "$@" | tee "$out.txt"
