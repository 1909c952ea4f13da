"""Two models on one GPU under alternating bursts (issue 13): one shared KV pool against
the same two engines with the budget statically split in half.

Model A (default: the Llama-3-8B shape) and model B (the Llama-3.2-1B shape), random
bf16 weights, both loaded for the whole run. The trace alternates: a burst of
--requests-a on A while B idles, then a burst of --requests-b on B while A idles,
--rounds times. Each burst is submitted at once and run to the end on the busy
engine; the idle one does what the server's idle loop does (``reclaim_idle``).

* ``shared``: ``SharedKVPool(--kv-cache-gib)``, both engines on it: the busy one takes
  the chunks the idle one holds (its idle slots, its unused grant).
* ``static``: each engine alone with half of --kv-cache-gib (what two servers, or two
  engines with a fixed split, get).

Each burst is sized to want more KV than half the budget, so the static split runs
it in smaller batches (or preempts). Prints a table (output tokens/s per model and
configuration, their ratio, preemptions) and writes --out JSON.

python3 benchmarks/two_models.py --out benchmarks/results/two_models_h100.json
Runs in ~4-5 min on one H100 with the defaults (--max-wall-s guards each configuration).
CPU smoke run: --device cpu --shape-a embedded --shape-b embedded --kv-cache-gib 0.002
--requests-a 6 --requests-b 6 --input-len 24 --output-len 8 --max-num-seqs 8.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from vtensor.bench.datasets import random_dataset
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams
from vtensor.engine.shared_pool import SharedKVPool
from vtensor.engine.warmup import warm_up

GiB = 1 << 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape-a", default="llama3-8b")
    ap.add_argument("--shape-b", default="llama3.2-1b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv-cache-gib", type=float, default=16.0, help="the whole KV budget")
    ap.add_argument("--requests-a", type=int, default=128)
    ap.add_argument("--requests-b", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", default="shared,static")
    ap.add_argument("--max-wall-s", type=float, default=150.0, help="per configuration's trace")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = [run_config(name, args) for name in args.configs.split(",")]
    table = report(runs)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "table": table}, f, indent=1)
        print(f"wrote {args.out}")


def engine_config(shape: str, args: argparse.Namespace, kv_bytes: int | None) -> EngineConfig:
    return EngineConfig(
        shape=None if shape == "embedded" else shape,
        device=args.device,
        dtype="auto",
        max_model_len=args.input_len + args.output_len + 64,
        max_num_seqs=args.max_num_seqs,
        kv_cache_bytes=kv_bytes,
        enable_prefix_caching=False,  # random prompts: isolate the memory sharing
    )


def build(name: str, args: argparse.Namespace) -> tuple[list[LLMEngine], SharedKVPool | None]:
    budget = int(args.kv_cache_gib * GiB)
    shapes = (args.shape_a, args.shape_b)
    engines: list[LLMEngine] = []
    pool = None
    try:
        if name == "shared":
            pool = SharedKVPool(budget, device=args.device)
            for tag, shape in zip("AB", shapes):
                engines.append(LLMEngine(engine_config(shape, args, None), kv_pool=pool, name=tag))
        elif name == "static":
            for shape in shapes:
                engines.append(LLMEngine(engine_config(shape, args, budget // 2)))
        else:
            raise ValueError(f"unknown configuration {name!r}: shared or static")
    except BaseException:
        for e in engines:
            e.close()
        raise
    return engines, pool


def run_config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    engines, pool = build(name, args)
    try:
        warm = [warm_up(e) for e in engines]
        for e in engines:
            e.reclaim_idle()
        print(f"[{name}] built and warmed up in {time.perf_counter() - t0:.0f}s "
              f"(warm-up {warm[0]:.1f}s, {warm[1]:.1f}s)", flush=True)  # fmt: skip
        bursts = trace(engines, args)
        out: dict[str, Any] = {"config": name, "bursts": bursts}
        if pool is not None and pool.stats() is not None:
            out["budget_end"] = repr(pool.stats())
        out["kv_capacity_chunks_end"] = [e.pool.stats().capacity_chunks for e in engines]
    finally:
        for e in engines:
            e.close()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the next configuration starts from the same memory
    return out


def trace(engines: list[LLMEngine], args: argparse.Namespace) -> list[dict[str, Any]]:
    counts = (args.requests_a, args.requests_b)
    deadline = time.perf_counter() + args.max_wall_s
    bursts = []
    for r in range(args.rounds):
        for i, engine in enumerate(engines):
            if time.perf_counter() > deadline:
                print(f"  stopped at the wall-time guard ({args.max_wall_s:.0f}s)", flush=True)
                return bursts
            other = engines[1 - i]
            row = burst(engine, other, counts[i], args, seed=10 * r + i)
            row.update(model="AB"[i], round=r)
            bursts.append(row)
            print(f"  round {r} model {'AB'[i]}: {row['output_tokens_per_s']:.0f} tok/s, "
                  f"{row['seconds']:.1f}s, preemptions {row['preemptions']}, "
                  f"KV capacity {row['kv_capacity_gib']:.2f} GiB", flush=True)  # fmt: skip
    return bursts


def burst(
    engine: LLMEngine, idle: LLMEngine, n: int, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    vocab = engine.model_config.vocab_size
    reqs = random_dataset(n, args.input_len, args.output_len, vocab, seed=seed)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    s0 = engine.stats()
    t0 = time.perf_counter()
    for r in reqs:
        engine.add_request(r.prompt_ids, params)
    tokens, peak, last_idle = 0, 0, t0
    while engine.has_unfinished():
        for o in engine.step():
            tokens += len(o.new_token_ids)
            if o.finished:
                engine.pop(o.rid)
        peak = max(peak, engine.pool.stats().capacity_chunks)
        if time.perf_counter() - last_idle > 0.05:  # the idle engine's server loop
            idle.reclaim_idle()
            last_idle = time.perf_counter()
    seconds = time.perf_counter() - t0
    s1 = engine.stats()
    engine.reclaim_idle()
    return {
        "requests": n,
        "seconds": seconds,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds if seconds else 0.0,
        "preemptions": s1.preemptions - s0.preemptions,
        "mapper_wait_s": s1.mapper_wait_s - s0.mapper_wait_s,
        "kv_capacity_gib": peak * engine.pool.chunk_size / GiB,
    }


def report(runs: list[dict[str, Any]]) -> str:
    by = {(run["config"], b["model"], b["round"]): b for run in runs for b in run["bursts"]}
    lines = [
        f"{'model':>5} {'round':>5} {'shared tok/s':>13} {'static tok/s':>13} {'ratio':>6} "
        f"{'preempt sh/st':>14} {'KV GiB sh/st':>13}"
    ]
    for key in sorted({(m, r) for _, m, r in by}):
        sh, st = by.get(("shared", *key)), by.get(("static", *key))
        a = sh["output_tokens_per_s"] if sh else float("nan")
        b = st["output_tokens_per_s"] if st else float("nan")
        ratio = a / b if sh and st and b else float("nan")
        pre = f"{sh['preemptions'] if sh else '-'}/{st['preemptions'] if st else '-'}"
        kv = f"{sh['kv_capacity_gib'] if sh else 0:.1f}/{st['kv_capacity_gib'] if st else 0:.1f}"
        lines.append(
            f"{key[0]:>5} {key[1]:>5} {a:>13.0f} {b:>13.0f} {ratio:>6.2f} {pre:>14} {kv:>13}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
