"""SharedKVBudget and KV managers drawing on it (torch-free): never over budget, the
reclaim order across members, asks served between steps, balance at the end."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtensor.kvcache.manager import KVCacheManager, KVGeometry
from vtensor.kvcache.radix_cache import RadixPrefixCache
from vtensor.kvcache.shared_budget import BudgetMember, KVLease, SharedKVBudget

CHUNK = 4096


class SimMember(BudgetMember):
    """An engine stand-in: its commands count as applied once taken."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.lease: KVLease | None = None
        self.busy = False  # in a step: give_back must refuse and leave an ask
        self.calls = 0

    def give_back(self, chunks: int, reclaim: bool) -> int:
        assert self.lease is not None
        self.calls += 1
        if self.busy:
            self.lease.ask(chunks, reclaim)
            return 0
        return self.serve(chunks, reclaim)

    def serve(self, chunks: int, reclaim: bool) -> int:
        assert self.lease is not None
        unused = self.kv.free_chunks
        if reclaim and chunks > unused:
            self.kv.reclaim(chunks - unused)
        self.kv.take_commands()
        return self.lease.settle(self.kv.books.committed)


def member(
    budget: SharedKVBudget, name: str, slots: int = 6, fixed: int = 1, keep_idle: int | None = None
) -> SimMember:
    geo = KVGeometry(slots, 64, 512, CHUNK, budget.total - fixed)  # 8 tokens per chunk
    sim = SimMember(KVCacheManager(geo, keep_idle_chunks=keep_idle))
    sim.lease = budget.join(name, fixed, sim, CHUNK)
    sim.kv.capacity.set_lease(sim.lease)
    return sim


def assert_within(budget: SharedKVBudget, members: list[SimMember]) -> None:
    assert budget.violations() == []
    assert sum(m.kv.books.committed + m.lease.fixed for m in members if m.lease) <= budget.total
    for m in members:
        assert m.lease is not None and m.kv.books.committed <= m.lease.grant
        m.kv.check()


def test_join_refuses_another_chunk_size_a_name_twice_and_too_much() -> None:
    budget = SharedKVBudget(10, CHUNK)
    sim = SimMember(KVCacheManager(KVGeometry(2, 64, 512, CHUNK, 9)))
    with pytest.raises(ValueError, match="same chunk size"):
        budget.join("a", 1, sim, 2 * CHUNK)
    budget.join("a", 1, sim, CHUNK)
    with pytest.raises(ValueError, match="already draws"):
        budget.join("a", 1, sim, CHUNK)
    with pytest.raises(ValueError, match="unallocated"):
        budget.join("b", 10, sim, CHUNK)
    with pytest.raises(ValueError):
        SharedKVBudget(0, CHUNK)
    assert budget.violations() == [] and budget.unallocated == 9


def test_grant_grows_before_a_map_and_settles_back() -> None:
    budget = SharedKVBudget(20, CHUNK)
    a = member(budget, "a")
    assert a.kv.free_chunks == 0  # nothing granted until asked for
    assert a.kv.admit(0, 30) is not None  # 4 chunks
    assert a.lease is not None and a.lease.grant >= 4 and a.kv.books.committed == 4
    a.kv.release(0)
    a.kv.reclaim_all()
    a.kv.take_commands()
    assert a.lease.settle(a.kv.books.committed) >= 4
    assert a.lease.grant == 0 and budget.unallocated == 19


def test_busy_member_takes_the_idle_members_chunks_before_preempting() -> None:
    budget = SharedKVBudget(17, CHUNK)  # 15 for requests after the two scratch chunks
    a, b = member(budget, "a"), member(budget, "b")
    for rid in range(3):  # b's burst: 3 x 4 chunks, then idle, kept (deferred reclamation)
        assert b.kv.admit(rid, 30) is not None
    for rid in range(3):
        b.kv.release(rid)
    assert b.kv.slots.idle_chunks == 12 and budget.unallocated == 3
    for rid in range(3):  # a's burst needs b's idle chunks
        assert a.kv.admit(rid, 30) is not None, rid
    assert a.kv.books.committed == 12 and b.kv.books.committed <= 3
    assert_within(budget, [a, b])
    assert b.kv.admit(9, 30) is None  # a's running chunks are pinned: b must wait
    assert_within(budget, [a, b])


def test_unused_grant_is_taken_before_anything_is_reclaimed() -> None:
    budget = SharedKVBudget(12, CHUNK)
    a, b = member(budget, "a"), member(budget, "b")
    assert b.lease is not None and b.lease.top_up(6) == 6  # granted, never used
    assert b.kv.admit(0, 20) is not None  # 3 chunks mapped, 3 granted and unused
    b.kv.release(0)
    assert a.kv.admit(0, 60) is not None  # 8 chunks: 4 unallocated + 3 unused + 1 idle
    assert b.kv.books.committed == 2  # only one of b's idle chunks was reclaimed
    assert_within(budget, [a, b])


def test_own_reclaimable_first_when_it_covers_the_shortfall() -> None:
    budget = SharedKVBudget(14, CHUNK)  # 12 for requests
    a, b = member(budget, "a"), member(budget, "b")
    for rid in (0, 1):  # a: two idle slots of 2 chunks each
        assert a.kv.admit(rid, 16) is not None
    assert b.kv.admit(0, 32) is not None  # b: one idle slot of 4
    for rid in (0, 1):
        a.kv.release(rid)
    b.kv.release(0)
    # 8 chunks: 2 kept in place, 4 unallocated, then a's own other idle slot (it covers
    # the last 2): b keeps everything.
    assert a.kv.admit(2, 64) is not None
    assert b.kv.books.committed == 4 and a.kv.books.committed == 8
    # 3 more: a has nothing reclaimable left, so b gives 3 of its idle chunks.
    assert a.kv.admit(3, 24) is not None
    assert b.kv.books.committed == 1 and a.kv.books.committed == 11
    assert_within(budget, [a, b])


def test_the_idle_members_prefix_cache_blocks_go_least_recently_used_first() -> None:
    budget = SharedKVBudget(10, CHUNK)  # 8 for requests
    a = member(budget, "a")
    geo = KVGeometry(6, 64, 512, CHUNK, budget.total - 1)
    b = SimMember(KVCacheManager(geo, prefix_cache=RadixPrefixCache(*geo.cache_block())))
    b.lease = budget.join("b", 1, b, CHUNK)
    b.kv.capacity.set_lease(b.lease)
    old, new = list(range(2, 26)), list(range(100, 124))  # 3 blocks each
    for rid, ids in ((0, old), (1, new)):
        assert b.kv.admit(rid, 25) is not None
        b.kv.cache_tokens(rid, ids, 24)
        b.kv.release(rid)
        b.kv.reclaim_all()  # idle slots let go; the cache keeps its blocks
    assert b.kv.books.cached_count == 6 and b.kv.books.committed == 6
    assert a.kv.admit(0, 40) is not None  # 5 chunks: 2 unallocated, 3 of b's blocks
    assert b.kv.match(new, 23).tokens == 16  # the older prompt's blocks went first
    assert b.kv.match(old, 23).tokens == 0
    assert_within(budget, [a, b])


def test_a_member_in_a_step_leaves_an_ask_served_between_steps() -> None:
    budget = SharedKVBudget(10, CHUNK)
    a, b = member(budget, "a"), member(budget, "b")
    assert b.kv.admit(0, 60) is not None
    b.kv.release(0)  # 8 idle chunks
    b.busy = True
    assert a.kv.admit(0, 30) is None  # b could not be asked: nothing is taken from it
    assert b.lease is not None and b.lease.asked >= 4 and b.kv.books.committed == 8
    chunks, reclaim = b.lease.take_asks()  # b's next step
    b.busy = False
    b.serve(chunks, reclaim)
    assert a.kv.admit(0, 30) is not None
    assert_within(budget, [a, b])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), total=st.integers(6, 40), n=st.integers(2, 3))
def test_random_traffic_never_exceeds_the_budget_and_balances(
    seed: int, total: int, n: int
) -> None:
    rng = random.Random(seed)
    budget = SharedKVBudget(total, CHUNK)
    members = [member(budget, f"m{i}", keep_idle=rng.choice([None, 0, 4])) for i in range(n)]
    running: list[dict[int, int]] = [{} for _ in members]
    rid = 0
    for _ in range(120):
        i = rng.randrange(n)
        m, mine = members[i], running[i]
        m.busy = rng.random() < 0.2
        for other in members:  # between its steps a member serves the asks it got
            if not other.busy and other is not m:
                assert other.lease is not None
                other.serve(*other.lease.take_asks())
        op = rng.random()
        if op < 0.4:
            tokens = rng.randint(1, 64)
            if m.kv.admit(rid, tokens) is not None:
                mine[rid] = tokens
            rid += 1
        elif op < 0.7 and mine:
            r = rng.choice(list(mine))
            mine[r] = min(64, mine[r] + rng.randint(1, 24))
            if not m.kv.grow(r, mine[r]):
                m.kv.release(r)  # the scheduler would preempt it
                del mine[r]
        elif mine:
            m.kv.release(r := rng.choice(list(mine)))
            del mine[r]
        m.kv.take_commands()
        m.busy = False
        assert_within(budget, members)
    for m, mine in zip(members, running):
        for r in list(mine):
            m.kv.release(r)
        m.kv.reclaim_all()
        m.kv.take_commands()
        assert m.lease is not None
        m.lease.settle(m.kv.books.committed)
    assert budget.unallocated == total - n and budget.violations() == []
