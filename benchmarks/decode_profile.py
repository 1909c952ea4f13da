"""Where a decode step spends its time (issue 11): torch.profiler over 20 engine steps of
exactly ``batch`` requests at context 1024, CUDA-graph decode, async scheduling. The
shape is ``$SHAPE`` (llama3-8b), at tensor-parallel size ``$TP`` (1; rank 0 is profiled).

Prints the step time (``decode_steps``, as ``bench offline`` times it), the GPU span and
busy time per step, the gaps between kernels, and the kernels by total time; writes the
Chrome trace to ``$OUT`` (default /tmp). Needs a GPU; ~40 s per batch on an H100.

python3 benchmarks/decode_profile.py 1 64
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from itertools import pairwise
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from vtensor import SamplingParams
from vtensor.bench.decode_table import _fill_batch, decode_steps, weight_bytes_read
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine

STEPS, CTX = 20, 1024
SHAPE = os.environ.get("SHAPE", "llama3-8b")
TP = int(os.environ.get("TP", "1"))  # under tensor parallelism: rank 0's kernels


def trace(batch: int, path: str) -> None:
    cfg = EngineConfig(shape=SHAPE, device="cuda", max_num_seqs=max(8, batch), max_model_len=4096,
                       enable_prefix_caching=False, tensor_parallel_size=TP)  # fmt: skip
    with LLMEngine(cfg) as engine:
        r = decode_steps(engine, batch, CTX, 64)
        print(f"batch {batch}: step {r['step_ms']:.3f} ms; weights "
              f"{weight_bytes_read(engine) / 1e9:.2f} GB", flush=True)  # fmt: skip
        params = SamplingParams(max_tokens=2000, ignore_eos=True, temperature=0)
        prompts = [[(i * 7 + j) % 1000 for j in range(CTX)] for i in range(batch)]
        rids = [x for g in engine.add_requests(prompts, params) for x in g]
        _fill_batch(engine, set(rids), CTX)
        for _ in range(10):
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(STEPS):
                engine.step()
            torch.cuda.synchronize()
        for x in rids:
            engine.abort(x)
            engine.pop(x)
    prof.export_chrome_trace(path)


def summarize(path: str) -> None:
    with open(path) as f:
        events: list[dict[str, Any]] = json.load(f)["traceEvents"]
    kinds = ("kernel", "gpu_memcpy", "gpu_memset")
    kern = sorted((e for e in events if e.get("cat") in kinds), key=lambda e: e["ts"])
    span = (kern[-1]["ts"] + kern[-1]["dur"] - kern[0]["ts"]) / 1e3
    busy = sum(e["dur"] for e in kern) / 1e3
    gaps = sum(max(0.0, b["ts"] - a["ts"] - a["dur"]) for a, b in pairwise(kern)) / 1e3
    print(f"{STEPS} steps: GPU span {span / STEPS:.3f} ms/step, kernels busy "
          f"{busy / STEPS:.3f} ms/step, gaps {gaps / STEPS:.3f} ms/step, "
          f"{len(kern) / STEPS:.0f} kernels/step")  # fmt: skip
    by: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kern:
        by[e["name"][:90]][0] += 1
        by[e["name"][:90]][1] += e["dur"]
    print("kernels by total time (us/step, calls/step, us/call):")
    for name, (n, d) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"  {d / STEPS:8.1f} {n / STEPS:6.1f} {d / n:7.2f}  {name}")


if __name__ == "__main__":
    out = os.environ.get("OUT", "/tmp")
    for b in [int(a) for a in sys.argv[1:]] or [1]:
        trace(b, f"{out}/decode_trace_b{b}.json")
        summarize(f"{out}/decode_trace_b{b}.json")
