"""The scheduler alone on a simulated clock: issue 14's memory-bound workload replayed
through the real torch-free ``Scheduler``, ``KVCacheManager``, swap planner and
SLO-aware admission, with a step-time model standing in for the GPU (torch-free).

Deterministic: the same requests and arrivals as ``benchmarks/swap.py`` (the same
seeds), and a clock that advances by the model's time of each step. It is what
explains the H100 result of ``benchmarks/results/swap_slo_h100_2026-11-22.json``
(docs/architecture.md, "SLO-aware admission") and what checks a policy change
before a GPU run:

    python3 -m vtensor.bench.slo_sim [--rate 1.5 --ttft-slo-ms 3000 --tpot-slo-ms 60]

The step-time model (:class:`StepCost`) is Llama-3-8B bf16 on one H100, fitted to
that run: a step costs ``base_s`` (the weights' read), plus ``decode_token_s`` per
token of context its decodes read, plus ``prefill_token_s`` per prefilled token,
plus the swap copies at ``copy_bytes_per_s`` (a swap-out blocks the step; a swap-in
is waited for before the forward pass). Sampled tokens are read at the step's end
(synchronous scheduling).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from vtensor.engine.admission_policy import AdmissionPolicy
from vtensor.engine.params import SamplingParams
from vtensor.engine.request import Request
from vtensor.engine.scheduler import Scheduler, SchedulerConfig
from vtensor.engine.scheduler_output import SchedulerOutput
from vtensor.engine.slo_admission import SLOAdmission
from vtensor.engine.slo_policy import SLOConfig, SLOPolicy
from vtensor.engine.swap_plan import SwapPlanner
from vtensor.kvcache.geometry import KVGeometry
from vtensor.kvcache.host_tier import SlotHostTier
from vtensor.kvcache.idle_policy import default_watermark
from vtensor.kvcache.manager import KVCacheManager
from vtensor.kvcache.swap_policy import ModelCost, SwapCostModel

from .datasets import random_dataset
from .serve import RunArgs, arrival_times
from .slo_timeline import Timeline

GIB = 2**30


@dataclass(frozen=True)
class StepCost:
    """Seconds a step takes (defaults: Llama-3-8B bf16 on an H100)."""

    base_s: float = 7.0e-3
    decode_token_s: float = 4.4e-8  # 128 KiB of KV a token at ~3 TB/s
    prefill_token_s: float = 2.4e-5
    copy_bytes_per_s: float = 54e9
    bytes_per_token: int = 128 << 10
    chunk_size: int = 2 << 20

    def step_s(self, out: SchedulerOutput) -> float:
        t = self.base_s
        for sp in out.spans:
            if sp.num_tokens == 1 and sp.samples:
                t += self.decode_token_s * sp.end
            else:
                t += self.prefill_token_s * sp.num_tokens
        copied = sum(p.extent.count for p in (*out.swapped_out, *out.swapped_in))
        return t + copied * self.chunk_size / self.copy_bytes_per_s


@dataclass(frozen=True)
class SimWorkload:
    num_prompts: int = 64
    input_len: int = 4500
    output_len: int = 512
    range_ratio: float = 0.6
    rate: float = 1.5
    kv_gib: float = 4.0
    swap_gib: float = 16.0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192


@dataclass
class SimResult:
    timeline: Timeline
    duration_s: float
    preemptions: int
    swap_outs: int
    slo_swap_outs: int
    steps: int
    ttft_s: dict[int, float] = field(default_factory=dict)
    tpot_s: dict[int, float] = field(default_factory=dict)


def build(
    w: SimWorkload, cost: StepCost, mode: str, slo: SLOConfig | None, policy: AdmissionPolicy | None
) -> tuple[Scheduler, list[float]]:
    """The scheduler as ``LLMEngine`` builds it for the workload; ``now`` (a one-item
    list) is the simulated clock the admission policy reads."""
    max_len = int(w.input_len * (1 + w.range_ratio)) + int(w.output_len * (1 + w.range_ratio))
    max_tokens = -(-max_len // 16) * 16
    capacity = int(w.kv_gib * GIB) // cost.chunk_size - 1  # the scratch slot's chunk
    geo = KVGeometry(
        w.max_num_seqs + 1, max_tokens, cost.bytes_per_token, cost.chunk_size, capacity
    )
    kv = KVCacheManager(geo, keep_idle_chunks=default_watermark(capacity), reserved_slots=1)
    swap = None
    if mode != "recompute":
        model = SwapCostModel(ModelCost(8_030_000_000, 32, 4096), 50e9, 6e14, "swap")
        slots = int(w.swap_gib * GIB) // cost.chunk_size
        swap = SwapPlanner(SlotHostTier(slots), model, cost.chunk_size)
    now = [0.0]
    admission = None
    if slo is not None and slo.enabled:
        admission = SLOAdmission(policy or SLOPolicy(slo), slo, lambda: now[0], swap)
    sched = SchedulerConfig(w.max_num_seqs, w.max_num_batched_tokens, 4)
    return Scheduler(sched, kv, swap, admission), now


def simulate(
    w: SimWorkload,
    mode: str = "swap",
    slo: SLOConfig | None = None,
    cost: StepCost | None = None,
    policy: AdmissionPolicy | None = None,
) -> SimResult:
    """Replay the workload; ``mode``: recompute (no host tier) or swap (forced swap);
    with ``slo`` the SLO-aware admission (``policy``: SLOPolicy by default)."""
    cost = cost or StepCost()
    s, now = build(w, cost, mode, slo, policy)
    data = random_dataset(w.num_prompts, w.input_len, w.output_len, 128_256, w.range_ratio)
    starts = arrival_times(len(data), RunArgs(w.rate, 1.0, None, 0))
    tl, res = Timeline(), SimResult(Timeline(), 0.0, 0, 0, 0, 0)
    res.timeline = tl
    pending = [
        Request.new(i, d.prompt_ids, _params(d.output_len), len(d.prompt_ids) + d.output_len, t)
        for i, (d, t) in enumerate(zip(data, starts))
    ]
    t, nxt = 0.0, 0
    while nxt < len(pending) or s.has_unfinished():
        while nxt < len(pending) and pending[nxt].arrival <= t:
            s.add(pending[nxt])
            tl.arrive(nxt, pending[nxt].arrival)
            nxt += 1
        if not s.has_unfinished():
            t = pending[nxt].arrival
            continue
        now[0] = t
        out = s.schedule()
        _apply(out)
        tl.observe(
            t,
            (r.rid for r in s.waiting),
            (r.rid for r in s.running),
            (r.rid for r in s.swapped),
        )
        dt = cost.step_s(out)
        if s.admission is not None and not out.is_decode:
            s.admission.meter.observe(dt, out.num_tokens)
        t += dt
        res.steps += 1
        _read(s, out, t, tl, res)
    res.duration_s = t
    res.preemptions = s.num_preemptions
    res.swap_outs = 0 if s.swap is None else s.swap.decisions.swaps
    res.slo_swap_outs = 0 if s.admission is None else s.admission.swap_outs
    return res


def _params(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def _apply(out: SchedulerOutput) -> None:
    """What ``LLMEngine._launch`` does to the requests (and the copies' ends)."""
    for req in out.preempted:
        req.preempt()
    for req in out.unswapped:
        req.unswap()
    for p in out.swapped_out:
        p.req.swap_out()
    for p in out.swapped_in:
        p.req.swap_in()
    for a in out.admitted:
        a.req.admit(a.num_cached)
    for sp in out.spans:
        sp.req.advance(sp.end, sp.samples)


def _read(s: Scheduler, out: SchedulerOutput, t: float, tl: Timeline, res: SimResult) -> None:
    """The step's sampled tokens, read at its end ``t``; finished requests leave."""
    if s.swap is not None:
        for p in out.swapped_out:
            s.swap.tier.end_out(p.req.rid)
        for p in out.swapped_in:
            s.swap.tier.end_in(p.req.rid)
    for sp in out.spans:
        if not sp.samples:
            continue
        req = sp.req
        req.append_output(sp.end, 1, None, t)
        tl.first_token(req.rid, t)
        if req.num_output >= (req.params.max_tokens or 0):
            s.remove(req)
            if s.admission is not None:
                s.admission.attainment.observe(req, s.admission.config)
            req.finish("length")
            tl.finish(req.rid, t)
            assert req.first_token_time is not None
            res.ttft_s[req.rid] = req.first_token_time - req.arrival
            res.tpot_s[req.rid] = (t - req.first_token_time) / max(1, req.num_output - 1)


def summary(name: str, r: SimResult, ttft_slo_s: float, tpot_slo_s: float) -> str:
    from .slo_timeline import misses

    ttft = sorted(r.ttft_s.values())
    n = len(ttft)
    p99 = ttft[min(n - 1, int(0.99 * n))]
    met = sum(x <= ttft_slo_s for x in ttft) / n
    tpot_met = sum(x <= tpot_slo_s for x in r.tpot_s.values()) / n
    return (
        f"{name:10s} {n / r.duration_s:.2f} req/s TTFT p50/p99 {ttft[n // 2] * 1e3:.0f}/"
        f"{p99 * 1e3:.0f} ms met {met:.0%} TPOT met {tpot_met:.0%} preempt {r.preemptions} "
        f"(swap {r.swap_outs}, SLO {r.slo_swap_outs})\n    {misses(r.timeline, ttft_slo_s).line()}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=1.5)
    ap.add_argument("--ttft-slo-ms", type=float, default=3000.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=60.0)
    ap.add_argument("--num-prompts", type=int, default=64)
    args = ap.parse_args()
    w = SimWorkload(num_prompts=args.num_prompts, rate=args.rate)
    slo = SLOConfig(args.ttft_slo_ms / 1e3, args.tpot_slo_ms / 1e3)
    for name, mode, cfg in (("recompute", "recompute", None), ("swap", "swap", None)):
        print(summary(name, simulate(w, mode, cfg), slo.ttft_slo_s or 0, slo.tpot_slo_s or 0))
    print(summary("slo", simulate(w, "swap", slo), slo.ttft_slo_s or 0, slo.tpot_slo_s or 0))


if __name__ == "__main__":
    main()
