#!/usr/bin/env bash
# Issue 13, two models on one H100 (run from the repository root; ~4-5 min): the
# Llama-3-8B and Llama-3.2-1B shapes on one shared 16 GiB KV pool against a static
# 8 + 8 GiB split, under alternating bursts. GPU tests separately:
#   python3 -m pytest -q tests/test_multimodel_gpu.py
# Writes benchmarks/results/two_models_h100_<date>.{json,txt}.
set -euo pipefail
day=$(date -u +%F)
out=benchmarks/results/two_models_h100_$day
timeout 360 python3 benchmarks/two_models.py --out "$out.json" | tee "$out.txt"
