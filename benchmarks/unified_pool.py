"""Issue 19, eLLM's long-context case scaled to one GPU: the unified memory pool against
the static split, in one process (one engine after the other).

Llama-3.1-8B shape (random bf16 weights; Llama-3-8B's with a 128k context), ``--num-requests``
prompts of ``--input-len`` random tokens (120k by default: the longest that leave room
for 256 output tokens in the shape's 128k context; at 128 KiB of KV per token one
request holds ~15 GiB, so an H100 holds 2-3), 256 output tokens each, all submitted at
once, prefilled in steps of up to ``--max-num-batched-tokens`` (64k), whose workspace
the static split must reserve for good. Prefix caching off (nothing is shared).

1. **unified**: ``unified_memory_pool=True``; warm-up measures the workspace table;
   the KV and the workspace share one budget ``U`` (what the GPU can spare).
2. **static**: the static split tuned as well as it can be: the KV pool gets exactly
   ``U - W(max_num_batched_tokens)``, the *measured* workspace of the largest step
   (the tightest reserve that is still safe), not the shape-based estimate.

Per pass: the largest batch that ran (most requests running at once), decode
throughput (output tokens per second over decode-only steps: no prompt token
computed), total time, preemptions, and for the unified pool inflates / deflates and
the most KV borrowed. Checked (exit 1 after the results are written): every request
of both passes produced all its tokens, the unified pool kept workspace + KV within
its budget at every step and its KV really borrowed from the workspace, and it ran at
least the static split's largest batch.

python3 benchmarks/unified_pool.py --out benchmarks/results/unified_pool_h100.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import sys
import time
from collections import defaultdict
from typing import Any

import torch

from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams
from vtensor.engine.warmup import warm_up

GIB = 2**30
MIN_STEPS = 5  # decode steps at a batch for its throughput to count


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.1-8b", help="'' for the embedded tiny model")
    ap.add_argument("--device", default=None, help="cpu: a smoke run of this script")
    ap.add_argument("--input-len", type=int, default=120_000)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--num-requests", type=int, default=4)
    ap.add_argument("--max-num-batched-tokens", type=int, default=65536)
    ap.add_argument("--attention-backend", default="fa2")
    ap.add_argument("--chunk-size", type=int, default=None, help="host backend only")
    ap.add_argument("--kv-cache-bytes", type=int, default=None, help="the unified budget")
    ap.add_argument(
        "--small-static-tokens", type=int, default=8192,
        help="a third pass: the static split with this smaller step budget (0: none)",
    )  # fmt: skip
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def base_config(a: argparse.Namespace, **kw: Any) -> EngineConfig:
    return EngineConfig(
        shape=a.shape or None,
        device=a.device,
        max_model_len=a.input_len + a.output_len + 1,
        max_num_seqs=a.num_requests,
        max_num_batched_tokens=a.max_num_batched_tokens,
        enable_prefix_caching=False,
        attention_backend=a.attention_backend,
        chunk_size=a.chunk_size,
        **kw,
    )


def run_pass(engine: LLMEngine, a: argparse.Namespace, name: str) -> dict[str, Any]:
    """Submit every request at once and step to the end, timing decode-only steps."""
    vocab, rng = engine.model_config.vocab_size, random.Random(0)
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    prompts = [[rng.randrange(vocab) for _ in range(a.input_len)] for _ in range(a.num_requests)]
    rids = [r for ids in engine.add_requests(prompts, params) for r in ids]
    sched, memory = engine.scheduler, engine.scheduler.memory
    max_running = borrowed = steps = 0
    decode_s = decode_tokens = 0.0
    violations: list[str] = []
    cuda = engine.runtime.device.type == "cuda"
    floor = torch.cuda.memory_reserved() if cuda else 0  # weights, graphs, tables
    device_peak = 0  # torch's reserve beyond the floor + the KV pool's chunks
    pool_peak = 0  # the pool's chunks: KV, and with the unified pool the workspace too
    workspace = engine.runner.workspace
    # Decode-only steps by batch (step seconds), and the host time the workspace's
    # releases and the waits for the mapper took in them: a slower decode is told
    # apart as per-step cost (every step) or as a few stalls.
    by_batch: dict[int, list[float]] = defaultdict(list)
    release_s = sync_s = 0.0
    c = engine.counters
    t0 = time.perf_counter()
    while engine.has_unfinished():
        reqs = list(sched.running)
        computed = sum(r.num_computed for r in engine.requests.values())
        outputs = sum(r.num_output for r in engine.requests.values())
        held = (c.workspace_release_s, c.kv_sync_s)
        # Synchronized around each step: with async scheduling a step's host time would
        # include waiting for the one before it (a long prefill chunk's seconds counted
        # as a decode step's); every pass pays the same lost overlap.
        if cuda:
            torch.cuda.synchronize()
        ts = time.perf_counter()
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - ts
        steps += 1
        max_running = max(max_running, len(sched.running), len(reqs))
        if sum(r.num_computed for r in engine.requests.values()) - computed <= len(reqs):
            decode_s += dt
            decode_tokens += sum(r.num_output for r in engine.requests.values()) - outputs
            by_batch[len(reqs)].append(dt)
            release_s += c.workspace_release_s - held[0]
            sync_s += c.kv_sync_s - held[1]
        if cuda:
            kv_bytes = engine.pool.stats().created * engine.pool.chunk_size
            pool_peak = max(pool_peak, kv_bytes)
            device_peak = max(device_peak, torch.cuda.memory_reserved() - floor + kv_bytes)
        if memory is not None:
            ws = None if workspace is None else workspace.held_chunks
            violations += memory.violations(engine.kv, held=ws)
            borrowed = max(borrowed, memory.snapshot(engine.kv).borrowed)
    total_s = time.perf_counter() - t0
    done = [engine.pop(r).num_output for r in rids]
    s, m = engine.stats(), engine.memory_stats()
    chunk = m.chunk_size
    return dict(
        name=name,
        completed=sum(1 for n in done if n == a.output_len),
        max_running=max_running,
        decode_tok_s=decode_tokens / decode_s if decode_s else 0.0,
        decode_step_ms={
            b: dict(
                steps=len(ts),
                p50=1e3 * statistics.median(ts),
                max=1e3 * max(ts),
                tok_s=b * len(ts) / sum(ts),
            )
            for b, ts in sorted(by_batch.items())
        },
        # Decode at the largest batch that ran ≥ MIN_STEPS decode steps: what the batch
        # buys once every request decodes (the per-step cost is the same code).
        decode_tok_s_at_max_batch=max(
            ((b, b * len(ts) / sum(ts)) for b, ts in by_batch.items() if len(ts) >= MIN_STEPS),
            default=(0, 0.0),
        )[1],
        decode_release_s=release_s,
        decode_kv_sync_s=sync_s,
        total_s=total_s,
        steps=steps,
        preemptions=s.preemptions,
        kv_capacity_gib=s.pool_capacity_chunks * chunk / GIB,
        inflates=m.kv_inflates,
        deflates=m.kv_deflates,
        deflate_preemptions=m.deflate_preemptions,
        max_borrowed_gib=borrowed * chunk / GIB,
        device_peak_gib=device_peak / GIB,  # torch beyond its floor + KV chunks (CUDA)
        pool_peak_gib=pool_peak / GIB,  # the chunk pool: KV (+ the workspace, unified)
        workspace_retries=engine.runner.workspace_retries,
        # Why the cache went back before a step, and the host time it took (the executor's).
        releases_for_kv=engine.counters.workspace_releases_for_kv,
        releases_for_step=engine.counters.workspace_releases_for_step,
        release_s=engine.counters.workspace_release_s,
        workspace_releases=0 if workspace is None else workspace.releases,
        budget_violations=violations[:5],
    )


def unified_pass(a: argparse.Namespace) -> dict[str, Any]:
    """Pass 1, in its own process: the unified pool, and the static split it implies."""
    engine = LLMEngine(base_config(a, unified_memory_pool=True, kv_cache_bytes=a.kv_cache_bytes))
    print(f"unified warm-up (measures the workspace): {warm_up(engine):.1f}s", flush=True)
    memory = engine.scheduler.memory
    assert memory is not None
    table, chunk = memory.planner.table, engine.kv.geometry.chunk_size
    reserve = table.chunks_for(table.max_tokens)
    info = dict(
        args=vars(a),
        table_source=table.source,
        table_mib={t: round(b / 2**20, 1) for t, b in table.points},
        table_margin_chunks=table.margin_chunks,
        unified_budget_gib=memory.budget * chunk / GIB,
        static_kv_bytes=(memory.budget - reserve + engine.scratch_chunks) * chunk,
    )
    if a.small_static_tokens:
        if not 0 < a.small_static_tokens < a.max_num_batched_tokens:
            raise ValueError("--small-static-tokens must be below --max-num-batched-tokens")
        small = table.chunks_for(a.small_static_tokens)
        info["small_static_kv_bytes"] = (memory.budget - small + engine.scratch_chunks) * chunk
    print(json.dumps(info, indent=1), flush=True)
    info["pass"] = run_pass(engine, a, "unified")
    print(json.dumps(info["pass"]), flush=True)
    engine.close()
    return info


def static_pass(a: argparse.Namespace, kv_bytes: int, tokens: int | None = None) -> dict[str, Any]:
    """Passes 2 and 3, each in its own process: the static split with the measured
    reserve of the largest step, at ``--max-num-batched-tokens`` or at ``tokens``."""
    b = argparse.Namespace(**vars(a))
    b.max_num_batched_tokens = tokens or a.max_num_batched_tokens
    engine = LLMEngine(base_config(b, kv_cache_bytes=kv_bytes))
    print(f"static warm-up: {warm_up(engine):.1f}s", flush=True)
    result = run_pass(engine, b, f"static-{b.max_num_batched_tokens}")
    print(json.dumps(result), flush=True)
    engine.close()
    return result


def main(argv: list[str] | None = None) -> int:
    """Each pass runs in a fresh process (spawn): the second engine gets the whole
    GPU, whatever the first left in torch's or the driver's hands."""
    a = parse(argv)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        info = pool.apply(unified_pass, (a,))
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        static = pool.apply(static_pass, (a, info["static_kv_bytes"]))
    results = [info.pop("pass"), static]
    if a.small_static_tokens:  # the static split tuned the other way: small steps
        args = (a, info["small_static_kv_bytes"], a.small_static_tokens)
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            results.append(pool.apply(static_pass, args))
    u, st = results[0], results[1]
    ratios: dict[str, Any] = {}
    for other in results[1:]:
        ratios[other["name"]] = dict(
            batch=u["max_running"] / max(1, other["max_running"]),
            decode=u["decode_tok_s"] / other["decode_tok_s"] if other["decode_tok_s"] else None,
            decode_at_max_batch=u["decode_tok_s_at_max_batch"]
            / max(1e-9, other["decode_tok_s_at_max_batch"]),
            total_time=other["total_s"] / u["total_s"],
        )
    checks = {
        "every request completed": u["completed"] == st["completed"] == a.num_requests,
        "workspace + KV <= budget at every step": not u["budget_violations"],
        "the KV borrowed from the workspace": u["max_borrowed_gib"] > 0,
        "unified ran at least the static batch": u["max_running"] >= st["max_running"],
    }
    report = dict(info, passes=results, ratios=ratios, checks=checks)
    print(json.dumps(dict(ratios=ratios, checks=checks), indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
