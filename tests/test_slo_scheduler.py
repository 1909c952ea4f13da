"""SLO-aware admission in the scheduler, torch-free, with a manual clock and a fake model:
an urgent head gets running requests swapped out for it (and is admitted in that very
step), a calm one waits, plans without a TTFT SLO equal plans without a policy, and under
hypothesis no victim is ever not running and the KV budget always holds."""

from __future__ import annotations

import random

from hypothesis import event, given, settings
from hypothesis import strategies as st

from vtensor.engine.admission_policy import FCFSPolicy
from vtensor.engine.params import SamplingParams
from vtensor.engine.request import Request
from vtensor.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from vtensor.engine.slo_admission import SLOAdmission
from vtensor.engine.slo_policy import SLOConfig, SLOPolicy
from vtensor.engine.swap_plan import SwapPlanner
from vtensor.kvcache.host_tier import SlotHostTier
from vtensor.kvcache.idle_policy import ManualClock
from vtensor.kvcache.manager import KVCacheManager, KVGeometry
from vtensor.kvcache.swap_policy import ModelCost, SwapCostModel

CHUNK = 4096  # 8 tokens of 512 bytes
STEP_S = 0.01  # the manual clock's time per step


def planner(tier_slots: int | None, mode: str = "swap") -> SwapPlanner | None:
    if tier_slots is None:
        return None
    cost = SwapCostModel(ModelCost(10**6, 2, 64), 5e9, 5e10, mode)
    return SwapPlanner(SlotHostTier(tier_slots), cost, CHUNK)


def make(
    capacity: int = 24,
    tier_slots: int | None = 64,
    slo: SLOConfig | None = None,
    policy: str = "slo",
    slots: int = 8,
    budget: int = 64,
) -> tuple[Scheduler, ManualClock]:
    geo = KVGeometry(slots, 256, 512, CHUNK, capacity)
    kv, clock, swap = KVCacheManager(geo), ManualClock(0.0), planner(tier_slots)
    cfg = slo if slo is not None else SLOConfig(ttft_slo_s=1.0, tpot_slo_s=1.0)
    pol = SLOPolicy(cfg) if policy == "slo" else FCFSPolicy()
    adm = None if policy == "none" else SLOAdmission(pol, cfg, clock, swap)
    return Scheduler(SchedulerConfig(slots, budget, 0), kv, swap, adm), clock


def request(rid: int, prompt_len: int, max_tokens: int, arrival: float) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Request.new(rid, [rid % 50 + 1] * prompt_len, params, prompt_len + max_tokens, arrival)


def launch(s: Scheduler, clock: ManualClock, rng: random.Random) -> SchedulerOutput:
    """One synchronous step, applied as ``LLMEngine`` applies it (the copies are instant),
    with a fake model; requests finish at max_tokens. The clock moves one step."""
    out = s.schedule()
    for q in out.preempted:
        q.preempt()
    for q in out.unswapped:
        q.unswap()
    tier = s.swap.tier if s.swap is not None else None
    for p in out.swapped_out:
        p.req.swap_out()
        assert tier is not None
        tier.end_out(p.req.rid)
    for p in out.swapped_in:
        p.req.swap_in()
        assert tier is not None
        tier.end_in(p.req.rid)
    for a in out.admitted:
        a.req.admit(a.num_cached)
    for sp in out.spans:
        sp.req.advance(sp.end, sp.samples)
    clock.advance(STEP_S)
    for sp in out.spans:
        if sp.samples:
            sp.req.append_output(sp.end, rng.randrange(100), None, clock())
            if sp.req.num_output >= (sp.req.params.max_tokens or 0):
                s.remove(sp.req)
                sp.req.finish("length")
    s.kv.check()
    assert s.kv.books.committed <= s.kv.capacity_chunks
    if tier is not None:
        assert not tier.violations()
    return out


def running_pair(s: Scheduler, clock: ManualClock) -> Request:
    """Two long requests decode until a 30-token head no longer fits; returns that head
    (not queued), arrived 0.9 s ago: with a 1 s TTFT SLO it is urgent."""
    rng = random.Random()
    for rid in (0, 1):
        s.add(request(rid, 40, 150, clock()))
    head = request(7, 30, 4, 0.0)
    for _ in range(200):
        launch(s, clock, rng)
        if len(s.running) == 2 and s.kv.admit_shortfall(31, 2) > 0:
            break
    assert len(s.running) == 2 and all(r.first_token_time is not None for r in s.running)
    assert s.kv.admit_shortfall(31, 2) > 0 and not s.swapped
    head.arrival = clock() - 0.9
    return head


def drain(s: Scheduler, clock: ManualClock, rng: random.Random) -> None:
    for _ in range(2000):
        if not s.has_unfinished():
            break
        launch(s, clock, rng)
    assert not s.has_unfinished()
    assert s.swap is None or s.swap.tier.usage().used_slots == 0


def test_an_urgent_head_is_admitted_by_swapping_out_running_requests() -> None:
    s, clock = make()
    rng = random.Random()
    head = running_pair(s, clock)
    before = list(s.running)
    s.add(head)
    out = launch(s, clock, rng)
    assert out.swapped_out, "no SLO swap-out"
    assert {p.req.rid for p in out.swapped_out} <= {r.rid for r in before}
    assert [a.req for a in out.admitted] == [head]
    assert not any(sp.req in [p.req for p in out.swapped_out] for sp in out.spans)
    assert s.admission is not None and s.admission.swap_outs == len(out.swapped_out)
    drain(s, clock, rng)  # the victims come back and finish
    assert all(r.num_output == r.params.max_tokens for r in [*before, head])


def test_a_calm_head_waits_until_it_is_urgent() -> None:
    s, clock = make(slo=SLOConfig(ttft_slo_s=0.2, tpot_slo_s=1.0))
    rng = random.Random()
    head = running_pair(s, clock)
    head.arrival = clock()  # slack 0.2 s: urgent once half of it is gone (10 steps)
    s.add(head)
    for _ in range(8):
        out = launch(s, clock, rng)
        assert not out.swapped_out and not out.admitted
    for _ in range(5):
        if launch(s, clock, rng).swapped_out:
            break
    else:
        raise AssertionError("the head became urgent but nothing was swapped out")
    assert head in s.running and s.num_preemptions == 1  # the one SLO swap-out
    drain(s, clock, rng)


def test_no_host_tier_or_recompute_mode_never_swaps_for_an_slo() -> None:
    for tier in (None, 64):
        s, clock = make(tier_slots=tier)
        if s.swap is not None:
            s.swap.cost = SwapCostModel(s.swap.cost.model, 5e9, 5e10, "recompute")
        rng = random.Random()
        head = running_pair(s, clock)
        s.add(head)
        out = launch(s, clock, rng)
        assert not out.swapped_out and not out.admitted
        assert s.admission is not None and s.admission.refused == 1
        drain(s, clock, rng)


def plan_signature(out: SchedulerOutput) -> tuple[object, ...]:
    return (
        [(sp.req.rid, sp.start, sp.num_tokens) for sp in out.spans],
        [r.rid for r in out.preempted],
        [(a.req.rid, a.num_cached) for a in out.admitted],
        [(p.req.rid, p.slot, p.extent) for p in out.swapped_out],
        [(p.req.rid, p.slot, p.extent) for p in out.swapped_in],
        [r.rid for r in out.unswapped],
        out.kv_commands,
        out.ahead_commands,
    )


def test_without_a_ttft_slo_plans_equal_the_scheduler_without_a_policy() -> None:
    """No policy (SLOs off: the engine builds none), FCFS through the policy plumbing, and
    a TPOT-only SLO make the same plans on a random overloaded workload."""
    seed = random.randrange(2**32)
    sigs = []
    tpot_only = SLOConfig(tpot_slo_s=0.001)  # every decode is behind it: never mind
    for policy, cfg in (("none", None), ("fcfs", None), ("slo", tpot_only)):
        s, clock = make(capacity=12, tier_slots=16, slo=cfg, policy=policy, budget=32)
        rng, arrivals = random.Random(seed), random.Random(seed + 1)
        sig = []
        for step in range(300):
            if step < 100 and arrivals.random() < 0.5:
                s.add(request(step, arrivals.randrange(4, 40), arrivals.randrange(1, 50), clock()))
            sig.append(plan_signature(launch(s, clock, rng)))
        drain(s, clock, rng)
        sigs.append(sig)
    assert sigs[0] == sigs[1] == sigs[2]
    assert any(sig[1] or sig[3] for sig in sigs[0]), "the workload never preempted: no test"


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    capacity=st.integers(8, 40),
    tier=st.one_of(st.none(), st.integers(0, 40)),
    ttft=st.floats(0.02, 0.5),  # steps of STEP_S: urgent within a few to 25 steps
    tpot=st.one_of(st.none(), st.floats(0.005, 0.1)),
)
def test_slo_scheduling_keeps_the_budget_and_picks_only_running_victims(
    data: st.DataObject, capacity: int, tier: int | None, ttft: float, tpot: float | None
) -> None:
    s, clock = make(capacity, tier, SLOConfig(ttft, tpot, no_reswap_steps=4), budget=24)
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1)))
    rid = 0
    cap = min(255, 8 * capacity - 1)  # tokens a request may reach: it fits the pool alone
    for _ in range(data.draw(st.integers(1, 120))):
        for _ in range(data.draw(st.integers(0, 2))):
            new = data.draw(st.integers(1, 30))
            s.add(request(rid, data.draw(st.integers(1, cap - new)), new, clock()))
            rid += 1
        if s.running and data.draw(st.integers(0, 7)) == 0:  # an abort
            victim = data.draw(st.sampled_from(s.running + list(s.swapped)))
            s.remove(victim)
            victim.finish("abort")
        running = {r.rid for r in s.running}
        before = s.admission.swap_outs if s.admission is not None else 0
        out = launch(s, clock, rng)
        assert {p.req.rid for p in out.swapped_out} <= running, "a victim that was not running"
        if s.admission is not None and s.admission.swap_outs > before:
            assert out.admitted, "SLO swap-outs that admitted nobody"
    assert s.admission is not None
    event(f"SLO swap-outs: {min(s.admission.swap_outs, 3)}")
    drain(s, clock, rng)
