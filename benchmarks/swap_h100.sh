#!/usr/bin/env bash
# Issue 14 (first slice) on one H100, from the repository root: the memory-bound workload
# (Llama-3-8B shape, 8 GiB KV, prompts 2k-8k, 256 out) recompute-only vs swap (forced)
# vs swap by the cost model, in one run, with the pinned copy ceiling (~5-7 min).
# GPU tests apart:  python3 -m pytest -q tests/test_swap_gpu.py
# Writes benchmarks/results/swap_h100_<date>.{json,txt}.
set -euo pipefail
day=$(date -u +%F)
out=benchmarks/results/swap_h100_$day
timeout 540 python3 benchmarks/swap.py --out "$out.json" "$@" | tee "$out.txt"
