"""The admission policies on their own (torch-free): SLO ordering by TTFT slack, victim
choice by TPOT slack, the guards (negative slack, thrash, stalled, not urgent), the
contract under hypothesis, the prefill meter, and the host-tier fallback of
``SLOAdmission``. Each expectation is computed here from the documented formulas."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtensor.engine.admission_policy import (
    FCFSPolicy,
    PrefillCostMeter,
    RunningView,
    WaitingView,
)
from vtensor.engine.slo_policy import SLOConfig, SLOPolicy, decode_step_s


def waiting(rng: random.Random, n: int, now: float) -> list[WaitingView]:
    return [
        WaitingView(i, now - rng.uniform(0, 5), rng.randrange(1, 4000), rng.random() < 0.2)
        for i in range(n)
    ]


def running_view(
    rid: int,
    first: float | None,
    generated: int,
    frees: int,
    last: float | None = None,
    swapped_at: int | None = None,
) -> RunningView:
    return RunningView(rid, first, generated, first if last is None else last, frees, swapped_at)


def test_waiting_requests_are_ordered_by_ttft_slack_started_first() -> None:
    rng = random.Random()
    now, ttft, cost = rng.uniform(10, 100), rng.uniform(0.1, 5), rng.uniform(0, 1e-3)
    pol = SLOPolicy(SLOConfig(ttft_slo_s=ttft))
    views = waiting(rng, 50, now)
    order = pol.order(views, now, cost)
    assert sorted(order) == list(range(50))
    started = [i for i in range(50) if views[i].started]
    assert order[: len(started)] == started  # kept at the front, in their order
    slacks = [views[i].arrival + ttft - now - cost * views[i].tokens for i in order[len(started) :]]
    assert slacks == sorted(slacks)


def test_without_a_ttft_slo_the_order_is_arrival_order() -> None:
    rng = random.Random()
    views = waiting(rng, 20, 50.0)
    assert SLOPolicy(SLOConfig(tpot_slo_s=0.05)).order(views, 50.0, 1e-4) == list(range(20))
    assert FCFSPolicy().order(views, 50.0, 1e-4) == list(range(20))


def final_slack(r: RunningView, now: float, tpot: float, decode_s: float) -> float:
    """TPOT slack over the whole output, from the documented formula."""
    assert r.first_token_time is not None
    budget = tpot * (r.num_generated + r.remaining - 1)
    return budget - (now - r.first_token_time) - decode_s * r.remaining


def test_victims_are_the_eligible_requests_with_most_tokens_to_go() -> None:
    """The longest to run first: its memory would come back last (the old choice, most
    slack, took requests about to finish, whose memory was coming back anyway)."""
    rng = random.Random()
    now, tpot = 100.0, 0.05
    pol = SLOPolicy(SLOConfig(ttft_slo_s=1.0, tpot_slo_s=tpot))
    runs = []
    for rid in range(12):
        gen, rem = rng.randrange(2, 200), rng.randrange(0, 600)
        first = now - rng.uniform(0, tpot * (gen + rem) * 1.2)  # some behind their budget
        runs.append(
            replace(running_view(rid, first, gen, rng.randrange(1, 6), now - 0.01), remaining=rem)
        )
    head = WaitingView(99, now - 0.9, 10, False)  # slack ~0.1 s < 0.5 s: urgent
    shortfall = rng.randrange(1, 10)
    plan = pol.make_room(head, shortfall, runs, now, 1, 0.0)
    assert runs[0].first_token_time is not None
    d = min((now - 0.01 - r.first_token_time) / (r.num_generated - 1) for r in runs)  # type: ignore[operator]
    eligible = [r for r in runs if final_slack(r, now, tpot, d) >= 0]
    ranked = sorted(eligible, key=lambda r: (-r.remaining, -r.rid))
    want, freed = [], 0
    for r in ranked:
        if freed >= shortfall:
            break
        want.append(r.rid)
        freed += r.frees_chunks
    assert plan.fits == (freed >= shortfall)
    assert list(plan.victims) == (want if plan.fits else [])


def test_tpot_slack_counts_the_whole_outputs_budget_and_the_tokens_to_go() -> None:
    rng = random.Random()
    now, tpot, d = rng.uniform(50, 100), rng.uniform(0.01, 0.1), rng.uniform(0.001, 0.01)
    pol = SLOPolicy(SLOConfig(ttft_slo_s=1.0, tpot_slo_s=tpot))
    r = replace(running_view(1, now - 3.0, 40, 4, now - 0.01), remaining=200)
    assert pol.tpot_slack(r, now, d) == pytest.approx(tpot * 239 - 3.0 - d * 200)
    # Just started, on pace: the old on-pace slack was ~0, the whole output's is large.
    fresh = replace(running_view(2, now - 0.02, 2, 4, now - 0.01), remaining=500)
    assert pol.tpot_slack(fresh, now, d) == pytest.approx(tpot * 501 - 0.02 - d * 500)
    assert pol.tpot_slack(running_view(3, None, 0, 4), now) == -math.inf
    assert SLOPolicy(SLOConfig(ttft_slo_s=1.0)).tpot_slack(r, now) == math.inf


def test_decode_step_is_the_least_mean_token_interval() -> None:
    views = [
        running_view(1, 10.0, 11, 1, last=11.0),  # 0.1 s a token
        running_view(2, 10.0, 101, 1, last=12.0),  # 0.02 s a token
        running_view(3, 10.0, 1, 1, last=10.0),  # one token: no interval
        running_view(4, None, 0, 1),
    ]
    assert decode_step_s(views) == pytest.approx(0.02)
    assert decode_step_s(views[2:]) == 0.0


def test_the_waiting_head_goes_before_swapped_requests_while_they_have_more_slack() -> None:
    """Earliest deadline first across the queues: swapped victims (TTFT met) wait while
    the head's TTFT slack is the smaller; once one's TPOT slack is smaller, it goes first."""
    rng = random.Random()
    now, ttft, tpot = 100.0, 3.0, 0.06
    pol = SLOPolicy(SLOConfig(ttft_slo_s=ttft, tpot_slo_s=tpot))
    gen, rem = rng.randrange(10, 100), rng.randrange(100, 400)
    first = now - rng.uniform(1, 10)
    swapped = [replace(running_view(1, first, gen, 0, first + 0.01 * (gen - 1)), remaining=rem)]
    head_arrival = now - rng.uniform(0, 4)
    head = WaitingView(7, head_arrival, 1000, False)
    cost = rng.uniform(0, 1e-4)
    head_slack = head_arrival + ttft - now - cost * 1000
    their = final_slack(swapped[0], now, tpot, 0.01)
    assert pol.waiting_first(head, swapped, now, cost) == (head_slack < their)
    later = now + max(their, 0.0) + 1.0  # theirs ran out; a head arriving then has 3 s
    assert not pol.waiting_first(replace(head, arrival=later), swapped, later, cost)
    assert not pol.waiting_first(replace(head, started=True), swapped, now, cost)
    for one in (SLOConfig(ttft_slo_s=ttft), SLOConfig(tpot_slo_s=tpot)):
        assert not SLOPolicy(one).waiting_first(head, swapped, now, cost)  # FCFS: theirs
    assert not FCFSPolicy().waiting_first(head, swapped, now, cost)


def test_swapped_requests_come_back_least_tpot_slack_first() -> None:
    rng = random.Random()
    now, tpot = 100.0, 0.05
    views = [
        replace(
            running_view(i, now - rng.uniform(0, 20), rng.randrange(2, 300), 0, now - 1),
            remaining=rng.randrange(0, 300),
        )
        for i in range(10)
    ]
    pol = SLOPolicy(SLOConfig(ttft_slo_s=1.0, tpot_slo_s=tpot))
    d = decode_step_s(views)
    order = pol.order_swapped(views, now)
    slacks = [final_slack(views[i], now, tpot, d) for i in order]
    assert sorted(order) == list(range(10)) and slacks == sorted(slacks)
    assert SLOPolicy(SLOConfig(ttft_slo_s=1.0)).order_swapped(views, now) == list(range(10))
    assert FCFSPolicy().order_swapped(views, now) == list(range(10))


def test_no_victim_with_negative_tpot_slack_even_if_that_leaves_the_head_waiting() -> None:
    now, tpot = 100.0, 0.05
    pol = SLOPolicy(SLOConfig(ttft_slo_s=1.0, tpot_slo_s=tpot))
    behind = running_view(1, now - 10.0, 10, 50, last=now - 0.01)  # 0.5 s budget, 10 s spent
    ahead = running_view(2, now - 0.1, 100, 2, last=now - 0.01)  # 5 s budget, 0.1 s spent
    head = WaitingView(9, now - 0.9, 10, False)
    assert pol.make_room(head, 3, [behind, ahead], now, 1, 0.0).victims == ()
    plan = pol.make_room(head, 2, [behind, ahead], now, 1, 0.0)
    assert plan.fits and plan.victims == (2,)


def test_guards_prefilling_stalled_recently_swapped_and_not_urgent() -> None:
    now = 100.0
    pol = SLOPolicy(SLOConfig(ttft_slo_s=1.0, tpot_slo_s=0.05, no_reswap_steps=8))
    head = WaitingView(9, now - 0.9, 10, False)
    prefilling = running_view(1, None, 0, 5)
    stalled = running_view(2, now - 1, 100, 5, last=now - 0.2)  # no token for 0.2 s > 50 ms
    swapped = running_view(3, now - 1, 100, 5, last=now, swapped_at=98)
    unswappable = running_view(4, now - 1, 100, 0, last=now)
    runs = [prefilling, stalled, swapped, unswappable]
    assert pol.make_room(head, 1, runs, now, 100, 0.0).victims == ()
    assert pol.make_room(head, 1, runs, now, 103, 0.0).victims == ()  # 8 steps not passed
    assert pol.make_room(head, 1, runs, now, 98 + 8, 0.0).victims == (3,)
    calm = WaitingView(9, now, 10, False)  # slack 1 s >= 0.5 s: waits
    assert pol.make_room(calm, 1, runs, now, 200, 0.0).victims == ()
    # The prefill estimate spends slack: 10 tokens of 60 ms make the calm head urgent.
    assert pol.make_room(calm, 1, runs, now, 200, 0.06).victims == (3,)
    started = WaitingView(9, now - 5, 10, True)  # its TTFT is spent
    assert pol.make_room(started, 1, runs, now, 200, 0.0).victims == ()


def test_without_a_tpot_slo_any_decoding_request_is_a_victim_newest_first() -> None:
    now = 100.0
    pol = SLOPolicy(SLOConfig(ttft_slo_s=1.0))
    runs = [running_view(r, now - 50, 1, 2, last=now - 40) for r in range(4)]
    plan = pol.make_room(WaitingView(9, now - 1, 10, False), 3, runs, now, 1, 0.0)
    assert plan.victims == (3, 2)


def test_fcfs_never_makes_room() -> None:
    runs = [running_view(1, 0.0, 100, 50)]
    plan = FCFSPolicy().make_room(WaitingView(9, -100.0, 10, False), 1, runs, 0.0, 1, 0.0)
    assert plan.victims == () and not plan.fits


view_st = st.builds(
    RunningView,
    rid=st.integers(0, 30),
    first_token_time=st.one_of(st.none(), st.floats(0, 100)),
    num_generated=st.integers(0, 500),
    last_token_time=st.one_of(st.none(), st.floats(0, 100)),
    frees_chunks=st.integers(0, 20),
    last_slo_swap_step=st.one_of(st.none(), st.integers(0, 50)),
    remaining=st.integers(0, 500),
)


@settings(max_examples=400, deadline=None)
@given(
    runs=st.lists(view_st, max_size=12, unique_by=lambda r: r.rid),
    shortfall=st.integers(1, 80),
    now=st.floats(0, 120),
    step=st.integers(0, 60),
    cost=st.floats(0, 0.01),
    ttft=st.floats(0.01, 10),
    tpot=st.one_of(st.none(), st.floats(0.001, 1)),
    arrival=st.floats(0, 120),
)
def test_policy_picks_only_running_and_never_admits_beyond_the_budget(
    runs: list[RunningView],
    shortfall: int,
    now: float,
    step: int,
    cost: float,
    ttft: float,
    tpot: float | None,
    arrival: float,
) -> None:
    pol = SLOPolicy(SLOConfig(ttft_slo_s=ttft, tpot_slo_s=tpot))
    plan = pol.make_room(WaitingView(99, arrival, 100, False), shortfall, runs, now, step, cost)
    by_id = {r.rid: r for r in runs}
    assert len(set(plan.victims)) == len(plan.victims)
    assert all(v in by_id for v in plan.victims), "a victim that is not running"
    freed = sum(by_id[v].frees_chunks for v in plan.victims)
    assert plan.fits == bool(plan.victims)  # shortfall > 0: fitting needs a victim
    assert plan.fits == (freed >= shortfall), "admits beyond the KV budget"
    for v in plan.victims:
        r = by_id[v]
        assert r.first_token_time is not None and r.frees_chunks > 0
        assert tpot is None or final_slack(r, now, tpot, decode_step_s(runs)) >= 0
        assert r.last_slo_swap_step is None or step - r.last_slo_swap_step >= 32
    order = pol.order_swapped(runs, now)
    assert sorted(order) == list(range(len(runs)))  # a permutation
    if runs:  # EDF: the head first iff its TTFT slack is below every swapped one's
        first = pol.waiting_first(WaitingView(99, arrival, 100, False), runs, now, cost)
        if tpot is None:
            assert not first
        else:
            least = min(final_slack(r, now, tpot, decode_step_s(runs)) if r.first_token_time
                        is not None else -math.inf for r in runs)  # fmt: skip
            assert first == (arrival + ttft - now - cost * 100 < least)


def test_prefill_meter_is_a_running_mean() -> None:
    rng = random.Random()
    m = PrefillCostMeter(alpha=0.5)
    assert m.s_per_token == 0.0
    a, b = rng.uniform(0.1, 1), rng.uniform(0.1, 1)
    m.observe(a * 100, 100)
    assert m.s_per_token == pytest.approx(a)
    m.observe(b * 10, 10)
    assert m.s_per_token == pytest.approx((a + b) / 2)
    m.observe(5.0, 0)  # nothing computed: ignored
    assert m.measurements == 2
    with pytest.raises(ValueError, match="alpha"):
        PrefillCostMeter(alpha=0)


@pytest.mark.parametrize(
    "kwargs", [{"ttft_slo_s": 0}, {"tpot_slo_s": -1.0}, {"ttft_slo_s": math.inf}, {"urgency": 0}]
)
def test_bad_slo_configs_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SLOConfig(**kwargs)


def test_bad_engine_slo_configs_are_refused() -> None:
    from vtensor.engine.config import EngineConfig

    for bad in (0, -5.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="ttft_slo_ms"):
            EngineConfig(ttft_slo_ms=bad)
        with pytest.raises(ValueError, match="tpot_slo_ms"):
            EngineConfig(tpot_slo_ms=bad)
    assert not EngineConfig().slo_enabled and EngineConfig(tpot_slo_ms=20).slo_enabled


def test_slo_admission_falls_back_without_room_in_the_host_tier(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The policy picks victims, but a missing or full tier refuses them: no victim, the
    refusal counted, logged once."""
    from tests.test_slo_scheduler import make, running_pair

    for tier_slots, expect_log in ((None, False), (1, True)):
        sched, clock = make(capacity=24, tier_slots=tier_slots)
        adm = sched.admission
        assert adm is not None
        head = running_pair(sched, clock)
        with caplog.at_level(logging.WARNING, logger="vtensor.engine.slo"):
            caplog.clear()
            for _ in range(3):
                adm.begin_step()
                short = sched.kv.admit_shortfall(head.num_tokens + 1, len(sched.running))
                assert short > 0
                plan = adm.plan_room(head, short, sched.running, sched.kv)
                assert plan.victims == () and not plan.fits
        assert adm.refused == 3 and adm.swap_outs == 0
        warned = [r for r in caplog.records if "cannot swap out" in r.message]
        assert len(warned) == (1 if expect_log else 0)  # no tier: the engine warned at start
