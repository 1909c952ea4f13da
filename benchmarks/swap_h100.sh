#!/usr/bin/env bash
# Issue 14 (first slice) on one H100, from the repository root: the memory-bound workload
# (Llama-3-8B shape, 8 GiB KV, 48 prompts of ~1.9k-7.7k tokens, 256 +-60% out, 2 req/s) recompute-only
# against swap (forced), in one process, with the pinned copy ceiling measured in the same
# run (~3-4 min; killed at 300 s). Extra flags go to benchmarks/swap.py, e.g.
# `--modes recompute,swap,auto` adds a pass where the cost model decides (~1 min more).
# Exits non-zero if a pass did not preempt or the swap pass did not swap out and back in.
# GPU tests apart:  python3 -m pytest -q tests/test_swap_gpu.py
# Writes benchmarks/results/swap_h100_<date>.{json,txt}.
set -euo pipefail
day=$(date -u +%F)
out=benchmarks/results/swap_h100_$day
timeout 300 python3 benchmarks/swap.py --out "$out.json" "$@" | tee "$out.txt"
