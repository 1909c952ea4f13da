"""Issue 14's memory-bound workload: recompute-only against swap to the host KV tier
and swap + SLO-aware admission, in one process, on one engine (the preemption mode and
the SLOs are switched between passes).

Llama-3-8B shape (random bf16 weights), the KV pool capped at ``--kv-gib`` (4),
64 prompts of ~1.8k-7.2k tokens (``--input-len`` 4500 +-60%), 512 +-60% output tokens
(the longest request, 7200 + 819 tokens, fits the shape's 8192-token context), Poisson
arrivals at ``--rate`` 6/s, past saturation for this pool: requests grow into each
other and preempt. (The first defaults, 8 GiB, 48 prompts of 256 out at 2/s, never
preempted on an H100: the comparison was void.) Per pass: throughput, TTFT and
TPOT p50/p99, preemptions (swapped / recomputed), the prompt tokens prefilled again
after a preemption by recompute, their share of all prefilled tokens and the
throughput ceiling of swap over recompute they allow (``vtensor/bench/recompute_waste``:
GPU time taken as proportional to tokens), swap GB/s out and in against the
pinned copy ceiling measured in the same run, and the memory held: GPU (the device's
peak use by ``cudaMemGetInfo``, the KV pool's peak chunks, the engine's classes at the
end) and the host tier's peak. Prefix caching off: random prompts share nothing, and
every swapped chunk is then private (the copy moves the whole KV).

The run fails (exit 1, after the results are written) unless every pass preempted and
the swap pass really swapped out and back in: otherwise it compared nothing.

SLO attainment (``--ttft-slo-ms``, ``--tpot-slo-ms``) is reported for every pass, by the
same client-side measure, with why the TTFT misses missed (``vtensor/bench/slo_timeline``:
each missed request's time before its first token split into queue wait, prefill and
swapped out, by the scheduler's queues seen after every step); only the ``slo`` pass
(forced swap, plus the engine's SLO-aware admission at those SLOs) acts on them.
``slo_swap_outs`` counts the running requests it swapped out to admit one about to miss
its TTFT.

python3 benchmarks/swap.py --out benchmarks/results/swap_h100.json   # ~4-5 min on an H100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from typing import Any

import torch

from vtensor.bench.arrivals import run_arrivals
from vtensor.bench.datasets import SyntheticRequest, random_dataset
from vtensor.bench.recompute_waste import RecomputeWaste
from vtensor.bench.slo_timeline import Timeline, misses
from vtensor.engine.config import EngineConfig
from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.outputs import StepOutput
from vtensor.engine.stats import EngineStats
from vtensor.engine.swap_setup import measure_copy_rate
from vtensor.models.config import shape_config

GIB = 2**30


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", help="'' for the embedded tiny model")
    ap.add_argument("--device", default=None, help="cpu: a smoke run of this script")
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--swap-gib", type=float, default=16.0)
    ap.add_argument("--rate", type=float, default=6.0, help="requests/s (Poisson)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=4500)
    ap.add_argument("--range-ratio", type=float, default=0.6)
    ap.add_argument("--output-len", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument(
        "--modes",
        default="recompute,swap,slo",
        help="passes, in order: recompute, swap (forced), auto (cost model), slo (forced "
        "swap and SLO-aware admission)",
    )
    ap.add_argument("--ttft-slo-ms", type=float, default=5000.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=100.0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    return ap.parse_args()


class Peaks:
    """Peak memory held during a pass, sampled every few steps (cheap calls only)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine, self.steps = engine, 0
        self.device = engine.arena.tensor.device
        self.gpu_used = self.pool_chunks = self.host_chunks = 0

    def sample(self, every: int = 8) -> None:
        self.steps += 1
        if self.steps % every:
            return
        st = self.engine.stats()
        self.pool_chunks = max(self.pool_chunks, st.pool_in_use_chunks)
        self.host_chunks = max(self.host_chunks, st.host_tier_used_chunks)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.gpu_used = max(self.gpu_used, total - free)

    def result(self) -> dict[str, Any]:
        chunk = self.engine.kv.geometry.chunk_size
        held = self.engine.memory_stats()
        return {
            "gpu_used_peak_gb": self.gpu_used / 1e9 if self.device.type == "cuda" else None,
            "kv_pool_peak_gb": self.pool_chunks * chunk / 1e9,
            "host_tier_peak_gb": self.host_chunks * chunk / 1e9,
            "engine_held_end_gb": held.held_bytes / 1e9,
            "engine_kv_held_end_gb": held.kv_held_bytes / 1e9,
        }


def run_pass(
    engine: LLMEngine, reqs: list[SyntheticRequest], rate: float, slo_ms: tuple[float, float]
) -> dict[str, Any]:
    """Submit at Poisson arrival times, step until all finish; latencies per request, and
    the share of requests within each SLO (``slo_ms``: TTFT, TPOT)."""
    before, peaks = engine.stats(), Peaks(engine)
    tl, sched = Timeline(), engine.scheduler

    def step() -> list[StepOutput]:
        t_step = time.perf_counter()
        for req in sched.waiting:  # arrived since the last step (perf_counter clock)
            if req.rid not in tl.requests:
                tl.arrive(req.rid, req.arrival)
        outputs = engine.step()
        # The queues as this step's schedule left them (a few hundred ids: cheap).
        tl.observe(
            t_step, *([r.rid for r in q] for q in (sched.waiting, sched.running, sched.swapped))
        )
        now = time.perf_counter()
        for o in outputs:
            tl.first_token(o.rid, now)
            if o.finished:
                tl.finish(o.rid, now)
        peaks.sample()
        return outputs

    run = run_arrivals(engine, reqs, rate, step)
    dur, sent, first, done = run.duration_s, run.sent, run.first, run.done
    ttft = run.ttft_s()
    tpot = [(done[r] - first[r]) / max(1, q.output_len - 1) for r, q in zip(sent, reqs)]
    return {
        "duration_s": dur,
        "requests_per_s": len(reqs) / dur,
        "output_tokens_per_s": sum(q.output_len for q in reqs) / dur,
        "total_tokens_per_s": sum(q.output_len + len(q.prompt_ids) for q in reqs) / dur,
        "ttft_ms": pcts(ttft),
        "tpot_ms": pcts(tpot),
        "slo_attainment": attainment(ttft, tpot, slo_ms),
        "ttft_misses": asdict(misses(tl, slo_ms[0] / 1e3)),
        **swap_counts(before, engine.stats()),
        **peaks.result(),
    }


def swap_counts(before: EngineStats, after: EngineStats) -> dict[str, Any]:
    """The pass's preemptions and copies: bytes, and GB/s by the copies' own time."""

    def gbps(nbytes: int, seconds: float) -> float | None:
        return nbytes / seconds / 1e9 if seconds > 0 else None

    out_b = after.swap_out_bytes - before.swap_out_bytes
    in_b = after.swap_in_bytes - before.swap_in_bytes
    out_s, in_s = after.swap_out_s - before.swap_out_s, after.swap_in_s - before.swap_in_s
    waste = RecomputeWaste(
        after.recomputed_prompt_tokens - before.recomputed_prompt_tokens,
        after.prefill_tokens - before.prefill_tokens,
        after.computed_tokens - before.computed_tokens,
    )
    return {
        **waste.as_dict(),
        "preemptions": after.preemptions - before.preemptions,
        "slo_swap_outs": after.slo_swap_outs - before.slo_swap_outs,
        "swap_preemptions": after.swap_preemptions - before.swap_preemptions,
        "swap_tier_full": after.swap_tier_full - before.swap_tier_full,
        "swap_dropped": after.swap_dropped - before.swap_dropped,
        "swap_out_gb": out_b / 1e9,
        "swap_in_gb": in_b / 1e9,
        "swap_out_gb_per_s": gbps(out_b, out_s),
        "swap_in_gb_per_s": gbps(in_b, in_s),
        "swap_gb_per_s": gbps(out_b + in_b, out_s + in_s),
    }


def attainment(
    ttft: list[float], tpot: list[float], slo_ms: tuple[float, float]
) -> dict[str, float]:
    """Shares of requests whose TTFT, TPOT, and both, met the SLOs (seconds vs ms)."""
    t_ok = [t * 1e3 <= slo_ms[0] for t in ttft]
    p_ok = [p * 1e3 <= slo_ms[1] for p in tpot]
    n = max(1, len(t_ok))
    return {
        "ttft": sum(t_ok) / n,
        "tpot": sum(p_ok) / n,
        "both": sum(a and b for a, b in zip(t_ok, p_ok)) / n,
    }


def pcts(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    return {
        "p50": 1e3 * statistics.median(s),
        "p99": 1e3 * s[min(len(s) - 1, int(0.99 * len(s)))],
        "mean": 1e3 * statistics.fmean(s),
    }


def model_len_for(args: argparse.Namespace) -> int:
    """``max_model_len``: the longest request the dataset can draw (prompt and output
    both up to ``(1 + range_ratio)`` times their mean, as ``random_dataset`` draws them),
    checked against the shape's context limit before any engine is built."""
    hi = 1 + args.range_ratio
    need = max(1, int(args.input_len * hi)) + max(1, int(args.output_len * hi))
    if args.shape:
        limit = shape_config(args.shape).max_position_embeddings
        if need > limit:
            raise SystemExit(
                f"the longest request ({need} tokens: --input-len {args.input_len} and "
                f"--output-len {args.output_len}, +-{args.range_ratio:.0%}) exceeds the "
                f"{args.shape} context of {limit} tokens: lower --input-len"
            )
    return need


def main() -> None:
    args = parse()
    max_len = model_len_for(args)
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
        # 256 MiB each way: the ceiling a swap's large runs of chunks could reach.
        ceiling = measure_copy_rate(device, 256 << 20) / 1e9 if device.type == "cuda" else None
        results["pinned_copy_ceiling_gb_per_s"] = ceiling
        vocab = engine.model_config.vocab_size
        reqs = random_dataset(
            args.num_prompts, args.input_len, args.output_len, vocab, args.range_ratio
        )
        slo_ms = (args.ttft_slo_ms, args.tpot_slo_ms)
        run_pass(engine, reqs[:2], 100.0, slo_ms)  # warm-up: kernels, graphs
        for mode in args.modes.split(","):
            preemption = {"auto": None, "slo": "swap"}.get(mode, mode)
            planner.cost = replace(planner.cost, mode=preemption)
            engine.set_slo(*(slo_ms if mode == "slo" else (None, None)))
            res = run_pass(engine, reqs, args.rate, slo_ms)
            results["passes"][mode] = res
            print(mode, json.dumps(res), flush=True)
        results["stats"] = asdict(engine.stats())
    summarize(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    problems = check(results["passes"])
    if problems:
        raise SystemExit("NOT A VALID COMPARISON: " + "; ".join(problems))


def check(passes: dict[str, dict[str, Any]]) -> list[str]:
    """Every pass preempted (memory-bound), and swap passes swapped out and in."""
    problems = []
    for mode, r in passes.items():
        if not r["preemptions"]:
            problems.append(f"{mode}: no preemption (not memory-bound: raise --rate)")
        if mode in ("swap", "slo") and not (r["swap_preemptions"] and r["swap_in_gb"] > 0):
            problems.append(f"{mode}: nothing was swapped out and back in")
        if mode == "recompute" and r["swap_preemptions"]:
            problems.append(f"{mode}: {r['swap_preemptions']} preemptions swapped")
        if mode != "slo" and r["slo_swap_outs"]:
            problems.append(f"{mode}: {r['slo_swap_outs']} SLO swap-outs without SLOs set")
    return problems


def summarize(results: dict[str, Any]) -> None:
    ceiling = results["pinned_copy_ceiling_gb_per_s"]
    print(f"pinned copy ceiling {ceiling} GB/s; cost model {results['cost_model']}")
    args = results["args"]
    print(f"SLOs: TTFT {args['ttft_slo_ms']:.0f} ms, TPOT {args['tpot_slo_ms']:.0f} ms")
    base = results["passes"].get("recompute")
    for mode, r in results["passes"].items():
        line = (
            f"{mode:9s} {r['requests_per_s']:.2f} req/s {r['total_tokens_per_s']:.0f} tok/s "
            f"TTFT p50/p99 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms "
            f"TPOT p50/p99 {r['tpot_ms']['p50']:.1f}/{r['tpot_ms']['p99']:.1f} ms "
            f"preempt {r['preemptions']} (swapped {r['swap_preemptions']}, for SLOs "
            f"{r['slo_swap_outs']}) SLO met: TTFT {r['slo_attainment']['ttft']:.0%} TPOT "
            f"{r['slo_attainment']['tpot']:.0%} both {r['slo_attainment']['both']:.0%}"
        )
        for way in ("out", "in"):
            rate = r[f"swap_{way}_gb_per_s"]
            if rate and ceiling:
                line += f" {way} {rate:.1f} GB/s = {rate / ceiling:.0%}"
        if base is not None and mode != "recompute":
            line += (
                f" | vs recompute: p99 TTFT x{base['ttft_ms']['p99'] / r['ttft_ms']['p99']:.2f}"
                f" lower, throughput x{r['total_tokens_per_s'] / base['total_tokens_per_s']:.2f}"
                f" (recompute's waste allows at most x{base['swap_throughput_ceiling']:.3f})"
            )
        print(line)
        waste = RecomputeWaste(r["recomputed_prompt_tokens"], r["prefill_tokens"],
                               r["computed_tokens"])  # fmt: skip
        print("  " + waste.line())
        m = r["ttft_misses"]
        causes = ", ".join(f"{k} {v}" for k, v in m["by_cause"].items())
        means = " / ".join(f"{m['mean_s'][k] * 1e3:.0f}" for k in ("queue", "prefill", "swapped"))
        print(
            f"  why TTFT missed: {m['missed']}/{m['requests']} (largest part: {causes}); mean ms "
            f"queue/prefill/swapped of the missed {means}; swap-outs after a first token "
            f"{m['victim_swap_outs']} ({m['victim_swapped_s']:.1f} s in the host tier)"
        )
        gpu = r["gpu_used_peak_gb"]
        print(
            f"  held: GPU peak {'n/a' if gpu is None else f'{gpu:.2f}'} GB, KV pool peak "
            f"{r['kv_pool_peak_gb']:.2f} GB, host tier peak {r['host_tier_peak_gb']:.2f} GB, "
            f"engine at the end {r['engine_held_end_gb']:.2f} GB"
        )


if __name__ == "__main__":
    main()
