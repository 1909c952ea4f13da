"""``vtensor bench offline``: throughput, decode step time against the physical
floor, KV memory waste and mapper waiting, with HF ``transformers`` as the peer.

Parts (each a table, all in one JSON):

* ``throughput``: vLLM's "random" workload through ``LLMEngine``; tokens/s,
  mapper wait as a share of step time, and mapped-vs-live KV per step.
* ``decode``: the step time of a full decode batch at each ``--decode-batches``
  size, against ``(weight bytes + KV bytes read) / measured read bandwidth``;
  measured with async scheduling and synchronously, on the same engine.
* ``hf``: ``transformers`` ``generate`` (static cache, sdpa) on the same shape
  and batches: its decode step time, and ours as a speed-up over it.
"""

from __future__ import annotations

import gc
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
from .hf_peer import hf_decode_step_or_none
from .report import environment, format_table, write_json


def engine_config(args: Any) -> EngineConfig:
    from vtensor.cli_generate import engine_kwargs

    return EngineConfig(**engine_kwargs(args))


def throughput(engine: LLMEngine, args: Any, input_len: int, output_len: int) -> dict[str, Any]:
    data = random_dataset(args.num_prompts, input_len, output_len, engine.model_config.vocab_size)
    for r in data:
        engine.add_request(r.prompt_ids, SamplingParams(max_tokens=r.output_len, ignore_eos=True))
    s0 = engine.stats()
    trace: list[tuple[int, int, int]] = []  # (running, waste bytes, kept-on-purpose bytes)
    t0 = time.perf_counter()
    done, last_print = 0, t0
    while engine.has_unfinished():
        done += sum(o.finished for o in engine.step())
        st = engine.stats()
        if st.running:
            trace.append((st.running, st.waste_bytes, st.idle_kv_bytes + st.surplus_kv_bytes))
        if time.perf_counter() - last_print > 5:
            last_print = time.perf_counter()
            print(f"  ... {done}/{len(data)} requests done", flush=True)
    wall = time.perf_counter() - t0
    s1 = engine.stats()
    out_tokens = sum(r.output_len for r in data)
    in_tokens = sum(len(r.prompt_ids) for r in data)
    chunk = s1.chunk_size
    per_req = [w / chunk / n for n, w, _ in trace]
    step_s = s1.step_s - s0.step_s
    return {
        "input_len": input_len,
        "output_len": output_len,
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
        "waste_chunks_per_running_mean": sum(per_req) / max(1, len(per_req)),
        "waste_chunks_per_running_max": max(per_req, default=0.0),
        "kept_kv_bytes_max": max((i for _, _, i in trace), default=0),  # idle + surplus
        "chunk_size": chunk,
    }


def decode_steps(engine: LLMEngine, batch: int, ctx: int, steps: int) -> dict[str, Any]:
    """Mean time of ``steps`` decode steps with ``batch`` requests at context ~``ctx``."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, temperature=0)
    rids = [
        engine.add_request([(i * 7 + j) % vocab for j in range(ctx)], params) for i in range(batch)
    ]
    while any(engine.seqs[r].num_output < 2 for r in rids):  # prefill everyone, one decode
        engine.step()
    if engine.runtime.device.type == "cuda":
        torch.cuda.synchronize()
    s0, t0 = engine.stats(), time.perf_counter()
    for _ in range(steps):
        engine.step()
    if engine.runtime.device.type == "cuda":
        torch.cuda.synchronize()  # async scheduling leaves the last step running: count it
    dt = (time.perf_counter() - t0) / steps
    s1 = engine.stats()
    for r in rids:
        engine.abort(r)
        engine.pop(r)
    cfg = engine.model_config
    # Bytes a step must move: the weights it reads (not an untied embedding table, of
    # which it gathers one row per request) and each request's KV at its mean context.
    weight_bytes = cfg.decode_read_params() * engine.runtime.dtype.itemsize
    kv_bytes = batch * (ctx + steps // 2) * engine.kv.geometry.bytes_per_token
    return {
        "batch": batch,
        "ctx": ctx,
        "step_ms": dt * 1e3,
        "weight_bytes": weight_bytes,
        "kv_bytes_read": kv_bytes,
        "mapper_wait_ms": (s1.mapper_wait_s - s0.mapper_wait_s) * 1e3,
    }


def main(args: Any) -> int:
    cfg = engine_config(args)
    print(f"vtensor bench offline: {cfg.model or cfg.shape or 'embedded tiny model'}", flush=True)
    result, model_cfg, rt = run_engine(cfg, args)
    gc.collect()  # the engine is closed: free its weights and graphs for the HF peer
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    result["read_bandwidth_gbs"] = _read_bandwidth(rt.device)
    if args.hf_peer:
        for d in result["decode"]:
            print(f"HF peer: batch {d['batch']}", flush=True)
            step_s = hf_decode_step_or_none(model_cfg, rt, d["batch"], d["ctx"], args.decode_steps)
            d["hf_step_ms"] = None if step_s is None else step_s * 1e3
    print_decode(result)
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
            f"  device={rt.device} dtype={rt.dtype} graphs={rt.use_cuda_graphs} "
            f"kv pool={engine.pool.capacity_bytes / 2**30:.1f} GiB",
            flush=True,
        )
        result: dict[str, Any] = {"config": {k: str(v) for k, v in asdict(cfg).items()}}
        result["throughput"] = []
        for inp, outp in args.workloads:
            print(f"throughput: {args.num_prompts} prompts, in {inp}, out {outp}", flush=True)
            result["throughput"].append(throughput(engine, args, inp, outp))
        print_throughput(result["throughput"])
        result["decode"] = []
        for b in args.decode_batches:
            print(f"decode: batch {b}, context {args.decode_ctx}", flush=True)
            engine.set_async_scheduling(False)
            sync = decode_steps(engine, b, args.decode_ctx, args.decode_steps)
            engine.set_async_scheduling(True)
            row = decode_steps(engine, b, args.decode_ctx, args.decode_steps)
            row["sync_step_ms"] = sync["step_ms"]
            result["decode"].append(row)
        engine.set_async_scheduling(rt.async_scheduling)
        return result, engine.model_config, rt


def print_throughput(rows: list[dict[str, Any]]) -> None:
    headers = ["in", "out", "req/s", "out tok/s", "total tok/s", "wait %", "kv sync %",
               "waste/req chunks (mean/max)", "preemptions"]  # fmt: skip
    table = [
        (t["input_len"], t["output_len"], t["requests_per_s"], t["output_tokens_per_s"],
         t["total_tokens_per_s"], f"{t['mapper_wait_pct_of_step']:.3f}",
         f"{t['kv_sync_pct_of_step']:.3f}",
         f"{t['waste_chunks_per_running_mean']:.2f}/{t['waste_chunks_per_running_max']:.2f}",
         t["preemptions"])
        for t in rows
    ]  # fmt: skip
    print(format_table(headers, table))


def print_decode(result: dict[str, Any]) -> None:
    """Add the floor and ratios to each decode row, and print them."""
    bandwidth = result["read_bandwidth_gbs"]
    table = []
    for d in result["decode"]:
        moved = d["weight_bytes"] + d["kv_bytes_read"]
        d["floor_ms"] = moved / (bandwidth * 1e9) * 1e3 if bandwidth else None
        d["x_floor"] = d["step_ms"] / d["floor_ms"] if d["floor_ms"] else None
        d["x_hf"] = d["hf_step_ms"] / d["step_ms"] if d.get("hf_step_ms") else None
        d["x_sync"] = d["sync_step_ms"] / d["step_ms"]
        table.append(
            (d["batch"], d["ctx"], d["step_ms"], d["floor_ms"] or "-", d["x_floor"] or "-",
             d["sync_step_ms"], d["x_sync"], d.get("hf_step_ms") or "-", d["x_hf"] or "-")
        )  # fmt: skip
    print(
        f"decode step (async scheduling) vs floor (weights + KV read at {bandwidth or 0:.0f} "
        "GB/s), vs synchronous steps and vs HF:"
    )
    headers = ["batch", "ctx", "step ms", "floor ms", "x floor", "sync ms", "x sync", "HF ms",
               "x HF"]  # fmt: skip
    print(format_table(headers, table))


def _read_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    from .ceilings import read_bandwidth

    return read_bandwidth()
