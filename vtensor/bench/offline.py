"""``vtensor bench offline``: throughput, decode step time against the physical
floor, KV memory and mapper waiting, with HF ``transformers`` as the peer.

Parts (each a table, all in one JSON):

* ``throughput``: vLLM's "random" workload through ``LLMEngine``; output and total
  tokens/s, mapper wait as a share of step time, and KV memory per step (waste and
  mapped-but-empty bytes per running request, bytes the pool holds).
* ``decode``: the step time of a constant decode batch at each ``--decode-batches``
  size, against ``(weight bytes + KV bytes really read) / measured read bandwidth``;
  measured with async scheduling and synchronously, on the same engine
  (``decode_table.py`` asserts the batch and counts the bytes).
* ``hf``: ``transformers`` ``generate`` (static cache, sdpa) on the same shape and
  batches, eager and compiled (``hf_peer.py``): its decode step time, and ours as a
  speed-up over each.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict
from typing import Any

import torch

from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams
from vtensor.engine.setup import EngineRuntime
from vtensor.models.config import ModelConfig

from .datasets import random_dataset
from .decode_table import add_floor, print_decode, run_decode_table
from .hf_peer import hf_compiled, hf_eager_step_or_none
from .kv_usage import KVSample, MiB, kv_sample, summarize
from .report import environment, format_table, write_json


def engine_config(args: Any) -> EngineConfig:
    from vtensor.cli_generate import engine_kwargs

    return EngineConfig(**engine_kwargs(args))


def throughput(engine: LLMEngine, args: Any, input_len: int, output_len: int) -> dict[str, Any]:
    vocab, prefix = engine.model_config.vocab_size, args.prefix_len
    data = random_dataset(args.num_prompts, input_len, output_len, vocab, prefix_len=prefix)
    for r in data:
        engine.add_request(r.prompt_ids, SamplingParams(max_tokens=r.output_len, ignore_eos=True))
    s0 = engine.stats()
    trace: list[KVSample] = []
    t0 = time.perf_counter()
    done, last_print = 0, t0
    while engine.has_unfinished():
        done += sum(o.finished for o in engine.step())
        trace.append(kv_sample(engine.stats()))
        if time.perf_counter() - last_print > 5:
            last_print = time.perf_counter()
            print(f"  ... {done}/{len(data)} requests done", flush=True)
    wall = time.perf_counter() - t0
    s1 = engine.stats()
    out_tokens = sum(r.output_len for r in data)
    in_tokens = sum(len(r.prompt_ids) for r in data)
    step_s = s1.step_s - s0.step_s
    queries = s1.prefix_cache_queries - s0.prefix_cache_queries
    hits = s1.prefix_cache_hits - s0.prefix_cache_hits
    return {
        "input_len": input_len,
        "output_len": output_len,
        "prefix_len": prefix,
        "prefix_caching": s1.prefix_caching,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "prefix_cache_evicted_chunks": s1.prefix_cache_evicted_chunks
        - s0.prefix_cache_evicted_chunks,
        "num_prompts": len(data),
        "wall_s": wall,
        "requests_per_s": len(data) / wall,
        "output_tokens_per_s": out_tokens / wall,
        "total_tokens_per_s": (in_tokens + out_tokens) / wall,
        "steps": s1.steps - s0.steps,
        "preemptions": s1.preemptions - s0.preemptions,
        "mapper_wait_s": s1.mapper_wait_s - s0.mapper_wait_s,
        "mapper_wait_pct_of_step": 100 * (s1.mapper_wait_s - s0.mapper_wait_s) / step_s,
        "mapper_waits": s1.mapper_waits - s0.mapper_waits,
        "kv_sync_s": s1.kv_sync_s - s0.kv_sync_s,
        "kv_sync_pct_of_step": 100 * (s1.kv_sync_s - s0.kv_sync_s) / step_s,
        "step_s": step_s,
        **summarize(trace, s1.chunk_size),
        "chunk_size": s1.chunk_size,
    }


def main(args: Any) -> int:
    from vtensor.cli_generate import engine_kwargs, serve_if_worker

    if serve_if_worker(engine_kwargs(args)):
        return 0
    cfg = engine_config(args)
    print(f"vtensor bench offline: {cfg.model or cfg.shape or 'embedded tiny model'}", flush=True)
    result, model_cfg, rt = run_engine(cfg, args)
    gc.unfreeze()  # run_engine froze the heap: the closed engine's cycles must be collectable
    gc.collect()  # the engine is closed: free its weights and graphs for the HF peer
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    result["read_bandwidth_gbs"] = _read_bandwidth(rt.device)
    run_hf(result["decode"], model_cfg, rt, args)
    result["decode_goal"] = add_floor(result["decode"], result["read_bandwidth_gbs"])
    print_decode(result["decode"], result["decode_goal"], result["read_bandwidth_gbs"])
    result["env"] = environment()
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


def run_engine(cfg: EngineConfig, args: Any) -> tuple[dict[str, Any], ModelConfig, EngineRuntime]:
    """Throughput workloads, then decode steps per batch size, on one engine."""
    with LLMEngine(cfg) as engine:
        rt = engine.runtime
        print(
            f"  device={rt.device} dtype={rt.dtype} attention={rt.attention_backend} "
            f"graphs={rt.use_cuda_graphs} tp={engine.group.size} "
            f"kv pool={engine.pool.capacity_bytes / 2**30:.1f} GiB (per GPU)",
            flush=True,
        )
        # As `vtensor serve` does after warm-up: start-up's heap out of the collector's
        # sight. A full collection mid-window measured 0.32 s on the H100 host, +10 ms on a
        # 32-step mean (a batch-256 decode step read 30.5 ms instead of 20.6 once).
        gc.collect()
        gc.freeze()
        result: dict[str, Any] = {"config": {k: str(v) for k, v in asdict(cfg).items()}}
        result["attention_backend"] = rt.attention_backend  # resolved (the config may say None)
        result["throughput"] = run_throughputs(engine, args)
        if result["throughput"]:
            print_throughput(result["throughput"])
            if args.compare_prefix_caching:
                print_prefix_comparison(result["throughput"])
        result["decode"] = run_decode_table(
            engine, args.decode_batches, args.decode_ctx, args.decode_steps, args.decode_sync
        )
        engine.set_async_scheduling(rt.async_scheduling)
        return result, engine.model_config, rt


def run_throughputs(engine: LLMEngine, args: Any) -> list[dict[str, Any]]:
    """Each workload once, or with ``--compare-prefix-caching N`` N pairs of runs with
    prefix caching off and on, each from an empty cache (after a warm-up, so that
    neither pays the kernels' compilation). The pairs alternate off-on, on-off, ...
    (ABBA), so that a drift over the runs (clocks, allocator) does not favour one."""
    workloads = [] if args.skip_throughput else args.workloads
    repeats = args.compare_prefix_caching
    modes: list[bool | None] = [None]
    if repeats:
        modes = [m for i in range(repeats) for m in ((False, True), (True, False))[i % 2]]
    if workloads and args.compare_prefix_caching:
        from vtensor.engine.warmup import warm_up

        print(f"warm-up: {warm_up(engine):.1f}s", flush=True)
    was_on = engine.kv.cache.enabled
    rows = []
    for inp, outp in workloads:
        for mode in modes:
            if mode is not None:
                engine.set_prefix_caching(mode)  # starts empty
            caching = "on" if engine.kv.cache.enabled else "off"
            print(f"throughput: {args.num_prompts} prompts, shared prefix {args.prefix_len}, "
                  f"in {inp}, out {outp}, prefix caching {caching}", flush=True)  # fmt: skip
            rows.append(throughput(engine, args, inp, outp))
    if args.compare_prefix_caching:
        engine.set_prefix_caching(was_on)
    return rows


def _pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Consecutive rows as (off, on) pairs, whichever ran first."""
    return [(a, b) if not a["prefix_caching"] else (b, a) for a, b in zip(rows[::2], rows[1::2])]


def print_prefix_comparison(rows: list[dict[str, Any]]) -> None:
    """Rows come in pairs, one off and one on: the gain of prefix caching on each
    workload (and each repeat, in the order they ran)."""
    table = []
    for off, on in _pairs(rows):
        table.append((f"{on['prefix_len']}+{on['input_len']}", on["output_len"],
                      off["requests_per_s"], on["requests_per_s"],
                      f"{on['requests_per_s'] / off['requests_per_s']:.3f}x",
                      f"{100 * on['prefix_cache_hit_rate']:.1f}"))  # fmt: skip
    headers = ["in (shared+own)", "out", "req/s off", "req/s on", "on / off", "hit %"]
    print("prefix caching, on against off (one engine, one process):")
    print(format_table(headers, table))
    gains: dict[tuple[int, int, int], list[float]] = {}
    for off, on in _pairs(rows):
        key = (on["prefix_len"], on["input_len"], on["output_len"])
        gains.setdefault(key, []).append(on["requests_per_s"] / off["requests_per_s"])
    for (prefix, inp, outp), g in gains.items():
        if len(g) > 1:  # repeats: the noise next to the gain
            print(f"  {prefix}+{inp}/{outp}: on / off {statistics.geometric_mean(g):.4f}x "
                  f"(geometric mean of {len(g)}; min {min(g):.4f}, max {max(g):.4f})")  # fmt: skip


def run_hf(rows: list[dict], cfg: ModelConfig, rt: EngineRuntime, args: Any) -> None:
    """HF's decode step at each batch: eager here, compiled in a time-bounded child
    (one GPU: not run against a tensor-parallel engine)."""
    if args.hf_peer and args.tensor_parallel_size > 1:
        print("HF peer skipped: it runs on one GPU, the engine on several", flush=True)
        return
    for d in rows:
        b, ctx, steps = d["batch"], d["ctx"], args.decode_steps
        if "eager" in args.hf_peer:
            print(f"HF eager: batch {b}", flush=True)
            step_s = hf_eager_step_or_none(cfg, rt, b, ctx, steps)
            d["hf_eager_step_ms"] = None if step_s is None else step_s * 1e3
        if "compiled" in args.hf_peer:
            print(f"HF compiled: batch {b} (at most {args.hf_compile_timeout:.0f} s)", flush=True)
            rec = hf_compiled(cfg, rt, b, ctx, steps, args.hf_compile_timeout)
            d["hf_compiled"] = rec
            ok = rec["status"] == "ok"
            d["hf_compiled_step_ms"] = rec["step_s"] * 1e3 if ok else None


def print_throughput(rows: list[dict[str, Any]]) -> None:
    headers = ["prefix", "in", "out", "cache", "hit %", "req/s", "output tok/s", "total tok/s",
               "wait %", "kv sync %", "waste/req chunks (mean/max)",
               "mapped-empty/req MiB (mean/max)", "held MiB (max)", "preemptions"]  # fmt: skip
    table = [
        (t["prefix_len"], t["input_len"], t["output_len"], "on" if t["prefix_caching"] else "off",
         f"{100 * t['prefix_cache_hit_rate']:.1f}", t["requests_per_s"], t["output_tokens_per_s"],
         t["total_tokens_per_s"], f"{t['mapper_wait_pct_of_step']:.3f}",
         f"{t['kv_sync_pct_of_step']:.3f}",
         f"{t['waste_chunks_per_running_mean']:.2f}/{t['waste_chunks_per_running_max']:.2f}",
         f"{t['empty_bytes_per_running_mean'] / MiB:.2f}/"
         f"{t['empty_bytes_per_running_max'] / MiB:.2f}",
         t["held_bytes_max"] / MiB, t["preemptions"])
        for t in rows
    ]  # fmt: skip
    print(format_table(headers, table))
    print(
        "  waste: mapped to running requests and empty, surplus of reused slots excluded; "
        "mapped-empty: the same with it;\n  held: every chunk the pool holds (running, "
        "idle slots, scratch, free list)"
    )


def _read_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from .ceilings import read_bandwidth

    return read_bandwidth()
