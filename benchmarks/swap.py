"""Issue 14's memory-bound workload: recompute-only against swap to the host KV tier,
in one process, on one engine (the preemption mode is switched between passes).

Llama-3-8B shape (random bf16 weights), the KV pool capped at ``--kv-gib`` (8),
prompts of 2k-8k tokens (``--input-len`` 5000 +-60%), 256 output tokens, Poisson
arrivals at ``--rate`` (near saturation for this pool). Per pass: throughput, TTFT and
TPOT p50/p99, preemptions (swapped / recomputed), swap GB/s against the pinned copy
ceiling measured in the same run. Prefix caching off: random prompts share nothing,
and every swapped chunk is then private (the copy moves the whole KV).

python3 benchmarks/swap.py --out benchmarks/results/swap_h100.json   # ~5-7 min on an H100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from typing import Any

from vtensor.bench.datasets import SyntheticRequest, random_dataset
from vtensor.bench.serve import RunArgs, arrival_times
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams
from vtensor.engine.swap_setup import measure_copy_rate

GIB = 2**30


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", help="'' for the embedded tiny model")
    ap.add_argument("--device", default=None, help="cpu: a smoke run of this script")
    ap.add_argument("--kv-gib", type=float, default=8.0)
    ap.add_argument("--swap-gib", type=float, default=16.0)
    ap.add_argument("--rate", type=float, default=2.0, help="requests/s (Poisson)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=5000)
    ap.add_argument("--range-ratio", type=float, default=0.6)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument(
        "--modes",
        default="recompute,swap,auto",
        help="passes, in order: recompute, swap (forced), auto (cost model)",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap.parse_args()


def run_pass(engine: LLMEngine, reqs: list[SyntheticRequest], rate: float) -> dict[str, Any]:
    """Submit at Poisson arrival times, step until all finish; latencies per request."""
    before = engine.stats()
    starts = arrival_times(len(reqs), RunArgs(rate, 1.0, None, 0))
    sent: dict[int, float] = {}
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    t0, nxt = time.perf_counter(), 0
    while len(done) < len(reqs):
        now = time.perf_counter() - t0
        while nxt < len(reqs) and starts[nxt] <= now:
            p = SamplingParams(max_tokens=reqs[nxt].output_len, ignore_eos=True, temperature=0)
            [rid] = engine.add_request(reqs[nxt].prompt_ids, p)
            sent[rid] = time.perf_counter()
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(0.001)
            continue
        for o in engine.step():
            first.setdefault(o.rid, time.perf_counter())
            if o.finished:
                done[o.rid] = time.perf_counter()
                engine.pop(o.rid)
    dur = time.perf_counter() - t0
    after = engine.stats()
    ttft = [first[r] - sent[r] for r in sent]
    tpot = [(done[r] - first[r]) / max(1, q.output_len - 1) for r, q in zip(sent, reqs)]
    moved = (after.swap_out_bytes - before.swap_out_bytes) + (
        after.swap_in_bytes - before.swap_in_bytes
    )
    copy_s = (after.swap_out_s - before.swap_out_s) + (after.swap_in_s - before.swap_in_s)
    return {
        "duration_s": dur,
        "requests_per_s": len(reqs) / dur,
        "output_tokens_per_s": sum(q.output_len for q in reqs) / dur,
        "total_tokens_per_s": sum(q.output_len + len(q.prompt_ids) for q in reqs) / dur,
        "ttft_ms": pcts(ttft),
        "tpot_ms": pcts(tpot),
        "preemptions": after.preemptions - before.preemptions,
        "swap_preemptions": after.swap_preemptions - before.swap_preemptions,
        "swap_tier_full": after.swap_tier_full - before.swap_tier_full,
        "swap_dropped": after.swap_dropped - before.swap_dropped,
        "swap_out_gb": (after.swap_out_bytes - before.swap_out_bytes) / 1e9,
        "swap_in_gb": (after.swap_in_bytes - before.swap_in_bytes) / 1e9,
        "swap_gb_per_s": moved / copy_s / 1e9 if copy_s else None,
    }


def pcts(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "p50": 1e3 * statistics.median(s),
        "p99": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))],
        "mean": 1e3 * statistics.fmean(s),
    }


def main() -> None:
    args = parse()
    max_len = int(args.input_len * (1 + args.range_ratio)) + args.output_len + 16
    cfg = EngineConfig(
        shape=args.shape or None,
        device=args.device,
        max_model_len=max_len,
        kv_cache_bytes=int(args.kv_gib * GIB),
        swap_space_bytes=int(args.swap_gib * GIB),
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
    )
    results: dict[str, Any] = {"args": vars(args), "passes": {}}
    with LLMEngine(cfg) as engine:
        assert engine.swap is not None
        planner = engine.swap.planner
        results["cost_model"] = {
            "copy_gb_per_s": planner.cost.copy_bytes_per_s / 1e9,
            "tflop_per_s": planner.cost.flops_per_s / 1e12,
        }
        device = engine.arena.tensor.device
        ceiling = measure_copy_rate(device) / 1e9 if device.type == "cuda" else None
        results["pinned_copy_ceiling_gb_per_s"] = ceiling
        vocab = engine.model_config.vocab_size
        reqs = random_dataset(
            args.num_prompts, args.input_len, args.output_len, vocab, args.range_ratio
        )
        run_pass(engine, reqs[:2], 100.0)  # warm-up: kernels, graphs
        for mode in args.modes.split(","):
            planner.cost = replace(planner.cost, mode=None if mode == "auto" else mode)
            res = run_pass(engine, reqs, args.rate)
            results["passes"][mode] = res
            print(mode, json.dumps(res), flush=True)
        results["stats"] = asdict(engine.stats())
    summarize(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


def summarize(results: dict[str, Any]) -> None:
    ceiling = results["pinned_copy_ceiling_gb_per_s"]
    print(f"pinned copy ceiling {ceiling} GB/s; cost model {results['cost_model']}")
    base = results["passes"].get("recompute")
    for mode, r in results["passes"].items():
        line = (
            f"{mode:9s} {r['requests_per_s']:.2f} req/s {r['total_tokens_per_s']:.0f} tok/s "
            f"TTFT p50/p99 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms "
            f"TPOT p50/p99 {r['tpot_ms']['p50']:.1f}/{r['tpot_ms']['p99']:.1f} ms "
            f"preempt {r['preemptions']} (swapped {r['swap_preemptions']})"
        )
        if r["swap_gb_per_s"] and ceiling:
            line += f" swap {r['swap_gb_per_s']:.1f} GB/s = {r['swap_gb_per_s'] / ceiling:.0%}"
        if base is not None and mode != "recompute":
            line += (
                f" | vs recompute: p99 TTFT x{base['ttft_ms']['p99'] / r['ttft_ms']['p99']:.2f}"
                f" lower, throughput x{r['total_tokens_per_s'] / base['total_tokens_per_s']:.2f}"
            )
        print(line)
        if not r["preemptions"]:
            print(f"  ({mode}: no preemption: not memory-bound at this rate; raise --rate)")


if __name__ == "__main__":
    main()
