#!/usr/bin/env bash
# Issue 14 (first slice) on one H100, from the repository root: the memory-bound workload
# (Llama-3-8B shape, 4 GiB KV, 64 prompts of ~1.8k-7.2k tokens, 512 +-60% out, 6 req/s) recompute-only
# against swap (forced) and the cost model's choice (auto), in one process, with the pinned copy
# ceiling measured in the same run (~3.5 min on an H100; killed at 540 s). Extra flags go to
# benchmarks/swap.py.
# Exits non-zero if a pass did not preempt or the swap pass did not swap out and back in.
# GPU tests apart:  python3 -m pytest -q tests/test_swap_gpu.py
# Writes benchmarks/results/swap_h100_<date>.{json,txt}.
set -euo pipefail
day=$(date -u +%F)
out=benchmarks/results/swap_h100_$day
timeout 540 python3 benchmarks/swap.py --modes recompute,swap,auto --out "$out.json" "$@" | tee "$out.txt"
