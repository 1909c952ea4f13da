"""Held memory against time under a bursty trace (issue 13): the engine alone (no HTTP),
bounded deferred reclamation ("elastic": the defaults) against the same engine with its
whole KV budget created up front and never given back ("prealloc": what a paged engine
does). Trace: a burst at --rate for --burst-s, --idle-s with no request, a second burst,
then --tail-s. Between steps, and while idle, it does what the server's idle loop does
(``LLMEngine.reclaim_idle``), and samples every --sample-ms: the KV the pool holds
(created chunks), torch's reserve and the driver's used memory (cudaMemGetInfo).

python3 benchmarks/held_memory.py --shape llama3-8b --out benchmarks/results/held_memory_h100.json

Prints, per configuration: throughput in each burst (output tokens/s), seconds from the
load dropping (the last request of burst 1 done) to held KV <= floor + watermark and to
the floor (scratch + prefix cache), the mapper wait as a share of step time; a plot
(--plot PATH, needs matplotlib). Goals (issue 13): <= floor + watermark within 1 s,
burst throughput within 2% of prealloc, mapper wait < 1% of step time.
Runs in ~6 min on one H100 with the defaults (two engines, ~100 s of trace each);
--max-wall-s stops a configuration's trace early (and says so) if it overruns.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from typing import Any

import torch

from vtensor.bench.datasets import random_dataset
from vtensor.bench.serve import RunArgs, arrival_times
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams
from vtensor.engine.warmup import warm_up
from vtensor.kvcache.idle_policy import default_watermark

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rate", type=float, default=16.0)
    ap.add_argument("--burst-s", type=float, default=30.0)
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--tail-s", type=float, default=5.0)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--sample-ms", type=float, default=100.0)
    ap.add_argument("--configs", default="elastic,prealloc")
    ap.add_argument("--kv-cache-gib", type=float, default=None, help="default: from free memory")
    ap.add_argument("--max-wall-s", type=float, default=200.0, help="per configuration's trace")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    results = [run_config(name, args) for name in args.configs.split(",")]
    payload = {"args": vars(args), "runs": results}
    report(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot)


def engine_config(name: str, args: argparse.Namespace) -> EngineConfig:
    kw: dict[str, Any] = dict(
        shape=args.shape or None,
        device=args.device,
        max_model_len=args.input_len + args.output_len + 64,
        enable_prefix_caching=False,  # random prompts: isolate idle reclamation
    )
    if args.kv_cache_gib:
        kw["kv_cache_bytes"] = int(args.kv_cache_gib * GiB)
    if name == "prealloc":
        kw.update(keep_idle_chunks=1 << 40, kv_idle_timeout_s=None)
    elif name != "elastic":
        raise ValueError(f"unknown configuration {name!r}: elastic or prealloc")
    return EngineConfig(**kw)


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = engine_config(name, args)
    t_build = time.perf_counter()
    with LLMEngine(cfg) as engine:
        build_s = time.perf_counter() - t_build
        warm_s = warm_up(engine)
        pool = engine.pool
        if name == "prealloc":
            pool.warm(pool.stats().capacity_chunks)  # every chunk created now, kept for good
        engine.reclaim_idle()
        print(f"[{name}] built in {build_s:.0f}s, warm-up {warm_s:.1f}s; "
              f"pool {pool.capacity_bytes / GiB:.1f} GiB")  # fmt: skip
        out = trace(engine, name, args)
        out.update(config=name, build_s=build_s, warm_up_s=warm_s)
        out["memory_end"] = asdict(engine.memory_stats())
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next configuration starts from the same free memory
    return out


def sample(engine: LLMEngine, t: float, tokens: int) -> dict[str, float]:
    kv, pool = engine.kv, engine.pool.stats()
    chunk = pool.chunk_size
    floor = (kv.geometry.chunks_for(1) + kv.books.cached_count) * chunk  # scratch + cache
    # The default watermark for both configurations (prealloc's own is its whole budget).
    watermark = default_watermark(kv.geometry.capacity_chunks)
    row = {
        "t": t,
        "kv_held": pool.created * chunk,
        "kv_floor": floor,
        "kv_floor_watermark": floor + watermark * chunk,
        "running": len(engine.scheduler.running),
        "waiting": len(engine.scheduler.waiting),
        "tokens": tokens,
    }
    if torch.cuda.is_available() and engine.runtime.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(engine.runtime.device)
        row["driver_used"] = total - free
        row["torch_reserved"] = torch.cuda.memory_reserved(engine.runtime.device)
    return row


def trace(engine: LLMEngine, name: str, args: argparse.Namespace) -> dict[str, Any]:
    vocab = engine.model_config.vocab_size
    n = max(1, int(args.rate * args.burst_s))
    reqs = random_dataset(2 * n, args.input_len, args.output_len, vocab, seed=1)
    gaps = arrival_times(n, RunArgs(args.rate, 1.0, None, 0))
    second = args.burst_s + args.idle_s
    starts = gaps + [second + g for g in gaps]
    params = [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for r in reqs]
    s0 = engine.stats()
    samples: list[dict[str, float]] = []
    burst_of: dict[int, int] = {}
    done_at: dict[int, float] = {}
    tokens = [0, 0]
    nxt, t0, last_sample, truncated = 0, time.perf_counter(), -1.0, False
    end = 2 * args.burst_s + args.idle_s
    while True:
        now = time.perf_counter() - t0
        if now > args.max_wall_s:
            truncated = True
            break
        while nxt < len(reqs) and starts[nxt] <= now:
            [rid] = engine.add_request(reqs[nxt].prompt_ids, params[nxt])
            burst_of[rid] = 0 if nxt < n else 1
            nxt += 1
        if now - last_sample >= args.sample_ms / 1e3:
            samples.append(sample(engine, now, sum(tokens)))
            last_sample = now
        if engine.has_unfinished():
            for o in engine.step():
                tokens[burst_of[o.rid]] += len(o.new_token_ids)
                if o.finished:
                    done_at[o.rid] = time.perf_counter() - t0
                    engine.pop(o.rid)
            continue
        if nxt >= len(reqs) and now > max(end, max(done_at.values(), default=0)) + args.tail_s:
            break
        engine.reclaim_idle()  # what the server's idle loop does
        time.sleep(0.005)
    s1 = engine.stats()
    step_s = s1.step_s - s0.step_s
    return {
        "truncated": truncated,
        "samples": samples,
        "bursts": burst_summary(starts, n, burst_of, done_at, tokens),
        "load_drop": drop_summary(samples, burst_of, done_at, second),
        "steps": s1.steps - s0.steps,
        "step_s": step_s,
        "mapper_wait_s": s1.mapper_wait_s - s0.mapper_wait_s,
        "mapper_wait_share": (s1.mapper_wait_s - s0.mapper_wait_s) / step_s if step_s else 0.0,
        "preemptions": s1.preemptions - s0.preemptions,
        "chunks_released": engine.pool.stats().released,
    }


def burst_summary(
    starts: list[float], n: int, burst_of: dict[int, int], done: dict[int, float], tokens: list[int]
) -> list[dict[str, float]]:
    out = []
    for b in (0, 1):
        ends = [t for rid, t in done.items() if burst_of[rid] == b]
        first = starts[0] if b == 0 else starts[n]
        span = (max(ends) - first) if ends else 0.0
        out.append({"requests_done": len(ends), "span_s": span,
                    "output_tokens_per_s": tokens[b] / span if span else 0.0})  # fmt: skip
    return out


def drop_summary(
    samples: list[dict[str, float]],
    burst_of: dict[int, int],
    done: dict[int, float],
    second: float,
) -> dict[str, float | None]:
    """Seconds from the last request of burst 1 finishing to the first sample with held
    KV <= floor + watermark, and <= floor, before burst 2 starts (``second``). None
    everywhere if burst 1 ran into burst 2 (no idle time: the engine was too slow)."""
    ends = [t for rid, t in done.items() if burst_of[rid] == 0]
    if not ends or max(ends) >= second:
        return {"drop_t": None, "to_floor_watermark_s": None, "to_floor_s": None}
    drop = max(ends)
    after = [s for s in samples if drop <= s["t"] < second]

    def first(key: str) -> float | None:
        hit = next((s["t"] for s in after if s["kv_held"] <= s[key]), None)
        return None if hit is None else hit - drop

    return {"drop_t": drop, "to_floor_watermark_s": first("kv_floor_watermark"),
            "to_floor_s": first("kv_floor")}  # fmt: skip


def report(results: list[dict[str, Any]]) -> None:
    print(f"{'config':9} {'burst1 tok/s':>12} {'burst2 tok/s':>12} {'peak KV GiB':>11} "
          f"{'idle KV GiB':>11} {'to fl+wm s':>10} {'to floor s':>10} {'map wait':>8}")  # fmt: skip
    for r in results:
        b = r["bursts"]
        d = r["load_drop"]
        peak = max(s["kv_held"] for s in r["samples"]) / GiB
        mid = [s for s in r["samples"] if d["drop_t"] is not None and s["t"] > d["drop_t"] + 5]
        idle = mid[0]["kv_held"] / GiB if mid else float("nan")  # 5 s after the drop
        fmt = lambda x: "never" if x is None else f"{x:.2f}"  # noqa: E731
        print(f"{r['config']:9} {b[0]['output_tokens_per_s']:12.0f} "
              f"{b[1]['output_tokens_per_s']:12.0f} {peak:11.2f} {idle:11.2f} "
              f"{fmt(d['to_floor_watermark_s']):>10} {fmt(d['to_floor_s']):>10} "
              f"{100 * r['mapper_wait_share']:7.2f}%"
              + ("  (TRUNCATED)" if r["truncated"] else ""))  # fmt: skip


def plot(results: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: skipped the plot (the JSON has every sample)")
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in results:
        ts = [s["t"] for s in r["samples"]]
        ax.plot(ts, [s["kv_held"] / GiB for s in r["samples"]], label=f"{r['config']}: KV held")
        if "driver_used" in r["samples"][0]:
            used = [s["driver_used"] / GiB for s in r["samples"]]
            ax.plot(ts, used, ":", label=f"{r['config']}: GPU used (driver)")
    floor = [s["kv_floor_watermark"] / GiB for s in results[0]["samples"]]
    ax.plot([s["t"] for s in results[0]["samples"]], floor, "k--", lw=0.8,
            label="KV floor + watermark")  # fmt: skip
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GiB")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
