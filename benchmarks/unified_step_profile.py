"""Issue 19: where the unified pool's decode step loses time against the static split
at the same batch (130k-token prompts: 25.8 vs 24.9 ms at batch 3, synchronized).

Each pass in its own process: the engine (unified pool, or the static split with the KV
share a step budget of ``--small-static-tokens`` leaves), ``--num-requests`` prompts of
``--input-len`` random tokens, stepped until every request decodes; then ``--warm``
decode steps untimed and ``--steps`` synchronized decode steps under torch.profiler.
Per pass: host ms per step (synchronized, as unified_pool.py times it), GPU kernel time
per step, the kernels' busy span, and the top kernels by time per step; then the
difference, kernel by kernel. The run stops there (no request runs to its end).

python3 benchmarks/unified_step_profile.py --input-len 130000 --num-requests 3
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import sys
import time
from collections import defaultdict
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from unified_pool import base_config, parse

from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams
from vtensor.engine.warmup import warm_up


def decode_steps(engine: LLMEngine, n: int) -> list[float]:
    """``n`` synchronized decode-only steps (asserted: no prompt token computed)."""
    times, sync = [], torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(n):
        running = len(engine.scheduler.running)
        computed = sum(r.num_computed for r in engine.requests.values())
        sync()
        t0 = time.perf_counter()
        engine.step()
        sync()
        times.append(time.perf_counter() - t0)
        grown = sum(r.num_computed for r in engine.requests.values()) - computed
        assert grown <= running, f"a step computed {grown} tokens at batch {running}"
    return times


def profile_pass(a: argparse.Namespace, unified: bool, kv_bytes: int | None) -> dict[str, Any]:
    b = argparse.Namespace(**vars(a))
    if not unified:
        b.max_num_batched_tokens = a.small_static_tokens
    cfg = base_config(b, unified_memory_pool=unified, kv_cache_bytes=kv_bytes)
    engine = LLMEngine(cfg)
    warm_up(engine)
    out: dict[str, Any] = {"name": "unified" if unified else f"static-{b.max_num_batched_tokens}"}
    if unified:
        memory = engine.scheduler.memory
        assert memory is not None
        chunk = engine.kv.geometry.chunk_size
        small = memory.planner.table.chunks_for(a.small_static_tokens)
        out["small_static_kv_bytes"] = (memory.budget - small + engine.scratch_chunks) * chunk
    vocab, rng = engine.model_config.vocab_size, random.Random(0)
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    prompts = [[rng.randrange(vocab) for _ in range(a.input_len)] for _ in range(a.num_requests)]
    engine.add_requests(prompts, params)
    while any(r.num_computed < r.num_prompt for r in engine.requests.values()):
        engine.step()
    out["batch"] = len(engine.scheduler.running)
    decode_steps(engine, a.warm)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        host = decode_steps(engine, a.steps)
    out["batch_after"] = len(engine.scheduler.running)
    out["host_ms"] = sorted(1e3 * t for t in host)
    out.update(kernel_table(prof, a.steps))
    engine.close()
    return out


def kernel_table(prof: Any, steps: int) -> dict[str, Any]:
    per: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    first, last = float("inf"), 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:90]
            per[name] += ev.device_time / steps  # us per step
            count[name] += 1
            first = min(first, ev.time_range.start)
            last = max(last, ev.time_range.end)
    top = sorted(per.items(), key=lambda kv: -kv[1])
    return dict(
        kernel_us_per_step=sum(per.values()),
        span_us_per_step=(last - first) / steps if per else 0.0,
        kernels={k: dict(us=round(v, 2), calls=count[k] // steps) for k, v in top},
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--json", default=None)
    own, rest = p.parse_known_args(argv)
    a = parse(rest)
    a.steps, a.warm = own.steps, own.warm
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        u = pool.apply(profile_pass, (a, True, a.kv_cache_bytes))
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        s = pool.apply(profile_pass, (a, False, u["small_static_kv_bytes"]))
    for r in (u, s):
        med = r["host_ms"][len(r["host_ms"]) // 2]
        print(
            f"{r['name']}: batch {r['batch']}->{r['batch_after']}, host step p50 {med:.2f} ms, "
            f"kernels {r['kernel_us_per_step'] / 1e3:.2f} ms/step, "
            f"span {r['span_us_per_step'] / 1e3:.2f} ms/step"
        )
    print("kernel                                                     unified us  static us  diff")
    names = list(dict.fromkeys([*u["kernels"], *s["kernels"]]))
    rows = [
        (n, u["kernels"].get(n, {}).get("us", 0.0), s["kernels"].get(n, {}).get("us", 0.0))
        for n in names
    ]
    for n, x, y in sorted(rows, key=lambda r: -abs(r[1] - r[2]))[:25]:
        print(f"{n[:58]:58} {x:10.1f} {y:10.1f} {x - y:+7.1f}")
    if own.json:
        with open(own.json, "w") as f:
            json.dump(dict(unified=u, static=s), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
