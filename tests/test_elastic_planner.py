"""The workspace table and the unified pool's planner, alone (torch-free)."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtensor.kvcache.elastic_planner import (
    Candidate,
    ElasticPlanner,
    PoolState,
    StaticPlanner,
    StepDemand,
)
from vtensor.kvcache.workspace_table import WorkspaceTable, doubling_points

CHUNK = 4096


def test_elastic_modules_import_no_torch() -> None:
    code = (
        "import sys, vtensor.kvcache.workspace_table, vtensor.kvcache.elastic_planner, "
        "vtensor.engine.elastic, vtensor.engine.scheduler; assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_doubling_points() -> None:
    assert doubling_points(1) == [1]
    assert doubling_points(8) == [1, 2, 4, 8]
    assert doubling_points(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    with pytest.raises(ValueError):
        doubling_points(0)


def test_table_interpolates_rounds_up_and_refuses_outside() -> None:
    t = WorkspaceTable.monotone([(1, 1000), (4, 4000), (8, 20000)], CHUNK, "measured")
    assert t.bytes_for(0) == 0 and t.bytes_for(1) == 1000
    assert t.bytes_for(2) == 2000 and t.bytes_for(3) == 3000
    assert t.bytes_for(5) == 8000 and t.bytes_for(8) == 20000
    assert t.bytes_for(7) == 4000 + math.ceil(16000 * 3 / 4)
    assert t.chunks_for(1) == 1 and t.chunks_for(8) == math.ceil(20000 / CHUNK)
    for bad in (-1, 9):
        with pytest.raises(ValueError, match="outside"):
            t.bytes_for(bad)


def test_table_margin_is_added_to_every_step_but_an_empty_one() -> None:
    points = [(1, 1000), (4, 4000), (8, 20000)]
    plain = WorkspaceTable.monotone(points, CHUNK, "measured")
    margin = random.randrange(1, 20)
    t = WorkspaceTable.monotone(points, CHUNK, "measured", margin)
    assert t.chunks_for(0) == 0
    for n in range(1, 9):
        assert t.bytes_for(n) == plain.bytes_for(n)
        assert t.chunks_for(n) == plain.chunks_for(n) + margin
    assert t.max_tokens_within(margin) == 0  # the margin alone leaves no room for a token
    with pytest.raises(ValueError, match="margin"):
        WorkspaceTable(tuple(points), CHUNK, "measured", -1)


def test_table_is_made_monotone_and_validated() -> None:
    t = WorkspaceTable.monotone([(4, 500), (1, 900), (2, 100)], CHUNK, "measured")
    assert t.points == ((1, 900), (2, 900), (4, 900))
    with pytest.raises(ValueError, match="increase"):
        WorkspaceTable(((2, 1), (2, 3)), CHUNK, "measured")
    with pytest.raises(ValueError, match="source"):
        WorkspaceTable(((1, 1),), CHUNK, "guessed")
    with pytest.raises(ValueError, match="at least one"):
        WorkspaceTable((), CHUNK, "measured")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 5000), st.integers(0, 10**7)), min_size=1, max_size=12),
    st.integers(0, 8),
)
def test_table_queries_are_monotone(raw: list[tuple[int, int]], margin: int) -> None:
    points = sorted(dict(raw).items())
    t = WorkspaceTable.monotone(points, CHUNK, "estimated", margin)
    prev = 0
    for n in range(0, t.max_tokens + 1, max(1, t.max_tokens // 200)):
        b = t.bytes_for(n)
        assert b >= prev
        prev = b
    for c in (0, 1, 5, 50, 10**4):
        n = t.max_tokens_within(c)
        assert n == 0 or t.chunks_for(n) <= c
        assert n == t.max_tokens or t.chunks_for(n + 1) > c


def table(per_token: int = CHUNK, top: int = 64) -> WorkspaceTable:
    """A workspace of ``per_token`` bytes a token (one chunk by default)."""
    return WorkspaceTable.monotone(
        [(n, n * per_token) for n in doubling_points(top)], CHUNK, "estimated"
    )


def test_static_planner_reserves_the_largest_step() -> None:
    p = StaticPlanner(table())
    plan = p.plan(PoolState(100, 10, 0, 0), StepDemand(2, 2, 2))
    assert plan.workspace == 64 and plan.kv_capacity == 36 and plan.token_budget == 2
    assert p.static_kv_capacity(100) == 36


def test_decode_steps_inflate_the_kv() -> None:
    p = ElasticPlanner(table(), kv_bytes_per_token=CHUNK // 4)
    plan = p.plan(PoolState(100, 50, 0, 0), StepDemand(4, 4, 4))
    assert plan.token_budget == 4 and plan.workspace == 4 and plan.kv_capacity == 96
    assert plan.kv_capacity > p.static_kv_capacity(100)  # borrowed from the workspace
    assert not plan.victims and plan.reclaim_idle == plan.reclaim_cached == 0


def test_a_big_step_deflates_idle_then_cached_kv() -> None:
    p = ElasticPlanner(table(), kv_bytes_per_token=CHUNK // 4)
    # 10 pinned, 30 idle, 40 cached: a 48-token step needs 48 + 12 + 1 chunks beside 10.
    plan = p.plan(PoolState(100, 80, 30, 40), StepDemand(1, 48, 1))
    assert plan.token_budget == 48 and plan.workspace == 48 and plan.kv_capacity == 52
    assert plan.reclaim_idle == 28 and plan.reclaim_cached == 0
    plan = p.plan(PoolState(100, 80, 10, 60), StepDemand(1, 48, 1))
    assert plan.reclaim_idle == 10 and plan.reclaim_cached == 18
    assert not plan.victims


def test_step_shrinks_to_what_fits_beside_pinned_kv() -> None:
    p = ElasticPlanner(table(), kv_bytes_per_token=CHUNK // 4)
    plan = p.plan(PoolState(100, 70, 0, 0), StepDemand(2, 64, 2))
    # W(t) + ceil(t/4) + 2 <= 30  ->  t = 22
    assert plan.token_budget == 22 and plan.kv_capacity == 78 and not plan.victims


def test_preempts_most_slack_first_only_when_decodes_do_not_fit() -> None:
    p = ElasticPlanner(table(), kv_bytes_per_token=CHUNK)
    cands = (Candidate(0, 30, slack=5, order=0), Candidate(1, 30, slack=90, order=1),
             Candidate(2, 30, slack=90, order=2))  # fmt: skip
    plan = p.plan(PoolState(100, 95, 0, 0), StepDemand(3, 3, 3, cands))
    assert [v.rid for v in plan.victims] == [2]  # most slack, the newer of two equals
    assert plan.kv_capacity >= 95 - 30 and plan.token_budget >= 2


def test_admits_the_queue_head_only_if_its_whole_prompt_fits() -> None:
    p = ElasticPlanner(table(), kv_bytes_per_token=CHUNK // 4)
    run_only = p.plan(
        PoolState(100, 60, 0, 0), StepDemand(4, 4, 4, queued_tokens=64, queued_chunks=50)
    )
    assert run_only.token_budget == 4  # the head does not fit: the KV inflates for the decodes
    admit = p.plan(
        PoolState(100, 20, 0, 0), StepDemand(4, 4, 4, queued_tokens=64, queued_chunks=20)
    )
    assert admit.token_budget > 4
    assert admit.kv_capacity - 20 >= 20  # the head's prompt fits the KV's share


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_plan_contract(data: st.DataObject) -> None:
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    per_token = rng.choice([CHUNK // 8, CHUNK, 3 * CHUNK])
    p = ElasticPlanner(table(per_token, rng.choice([8, 64, 100])), rng.choice([CHUNK // 16, CHUNK]))
    budget = rng.randint(1, 400)
    committed = rng.randint(0, budget)
    idle = rng.randint(0, committed)
    cached = rng.randint(0, committed - idle)
    n = rng.randint(0, 8)
    pinned = committed - idle - cached
    frees = [rng.randint(0, pinned) for _ in range(n)]
    cands = tuple(Candidate(i, f, rng.randint(0, 50), i) for i, f in enumerate(frees))
    run = rng.randint(n, n + 100)
    demand = StepDemand(
        n, run, n + rng.randint(0, 3), cands, rng.randint(0, 50), rng.randint(0, 80)
    )
    state = PoolState(budget, committed, idle, cached)
    plan = p.plan(state, demand)
    if not p.may_preempt(state, demand):  # the candidates cannot matter: same plan without
        assert not plan.victims and p.plan(state, replace(demand, candidates=())) == plan
    assert plan.workspace + plan.kv_capacity == budget
    assert plan.workspace == p.table.chunks_for(plan.token_budget)
    freed = min(pinned, sum(v.frees for v in plan.victims))
    assert pinned - freed <= plan.kv_capacity  # reclaims can reach the share
    assert committed - plan.reclaim_idle - plan.reclaim_cached <= max(plan.kv_capacity, committed)
    assert len({v.rid for v in plan.victims}) == len(plan.victims)
    if not plan.victims:
        assert committed - plan.reclaim_idle - plan.reclaim_cached <= plan.kv_capacity
