"""SpillRadixCache unit tests (torch-free): spill on eviction, match through settled
host blocks only, restore, room for swap first (host LRU leaves, settled and unlocked
only), a full tier degrading to plain eviction, an insert reinstating a host block."""

from __future__ import annotations

import random

from vtensor.kvcache.host_tier import SlotHostTier, SwapState
from vtensor.kvcache.prefix_cache import ROOT
from vtensor.kvcache.radix_spill import SpillRadixCache


def tokens(n: int) -> list[int]:
    return [random.randrange(1000) for _ in range(n)]


def settle(cache: SpillRadixCache) -> list[int]:
    """What the engine does after a step's copies: end each spill's copy-out."""
    keys = [s.key for s in cache.take_spills() if cache.tier.extent(s.key) is not None]
    for k in keys:
        cache.tier.end_out(k)
    return keys


def test_spill_match_restore_round_trip() -> None:
    tier = SlotHostTier(8)
    cache = SpillRadixCache(2, 1, tier)
    t = tokens(7)
    cache.insert(ROOT, t, [10, 11, 12], 3)
    assert cache.evict() == (12,)  # the leaf leaves the GPU, its node stays on the host
    assert cache.evict() == (11,)
    spills = cache.take_spills()
    assert [s.chunks for s in spills] == [(12,), (11,)]
    hit = cache.match(t, 6)
    assert (hit.tokens, hit.chunks, hit.restore) == (2, (10,), 0)  # copies in flight: stop
    for s in spills:
        tier.end_out(s.key)
    hit = cache.match(t, 6)
    assert (hit.tokens, hit.chunks, hit.restore) == (6, (10,), 2)
    assert cache.stats().host_blocks == 2 and tier.usage().spill_slots == 2
    cache.lock(hit.path)
    extents = cache.restore(hit.path, [21, 22])
    assert [(e.first, e.state) for e in extents] == [(1, SwapState.COPYING_IN)] * 1 + [
        (2, SwapState.COPYING_IN)
    ]
    assert cache.locked_chunk_ids() == {10, 21, 22} and not cache.violations()
    for e in extents:
        tier.end_in(e.rid)
    assert tier.usage().used_slots == 0 and cache.stats().restored_blocks == 2
    assert cache.match(t, 6).chunks == (10, 21, 22)


def test_free_host_drops_lru_settled_unlocked_leaves_only() -> None:
    tier = SlotHostTier(3)
    cache = SpillRadixCache(2, 1, tier)
    a, b = tokens(4), tokens(4)
    cache.insert(ROOT, a, [1, 2], 2)
    cache.insert(ROOT, b, [3, 4], 2)
    cache.match(b, 4)  # b more recent than a
    for _ in range(3):
        cache.evict()
    settle(cache)  # a's two blocks, then b's leaf, on the host: the tier is full
    assert tier.usage().used_slots == 3
    assert cache.free_host(4) == 0  # not reachable: nothing dropped
    assert cache.stats().host_blocks == 3
    assert cache.free_host(1) == 1  # a's leaf (least recently used) goes
    assert cache.match(a, 4).restore == 1 and cache.match(b, 4).restore == 1
    assert cache.free_host(3) == 2 and cache.stats().host_blocks == 0  # both left: a, then b
    assert cache.match(b, 4).chunks == (3,) and not cache.violations()


def test_parent_spill_drops_its_settled_child_for_room() -> None:
    tier = SlotHostTier(2)
    cache = SpillRadixCache(2, 1, tier)
    t = tokens(6)
    cache.insert(ROOT, t, [1, 2, 3], 3)
    assert cache.evict() == (3,)
    settle(cache)
    assert tier.begin_out(7, 0, 1) is not None  # a swapped request: the tier is full
    assert cache.evict() == (2,)  # room by dropping the settled host leaf (block 3)
    settle(cache)
    s = cache.stats()
    assert (s.host_blocks, s.host_dropped_blocks) == (1, 1) and not cache.violations()
    assert cache.match(t, 6).restore == 1  # block 2 on the host, block 3 gone


def test_no_room_drops_the_block_and_its_host_subtree() -> None:
    tier = SlotHostTier(2)
    cache = SpillRadixCache(2, 1, tier)
    t = tokens(4)
    cache.insert(ROOT, t, [1, 2], 2)
    assert cache.evict() == (2,)  # its copy-out not made yet: not droppable
    assert tier.begin_out(7, 0, 1) is not None  # a swapped request: the tier is full
    assert cache.evict() == (1,)  # no room: dropped, with its in-flight host child
    assert cache.stats().blocks == 0 and tier.usage().used_slots == 1
    assert [tier.extent(s.key) for s in cache.take_spills()] == [None]  # copy skipped
    assert not cache.violations()


def test_insert_reinstates_a_host_block() -> None:
    tier = SlotHostTier(4)
    cache = SpillRadixCache(2, 1, tier)
    t = tokens(4)
    cache.insert(ROOT, t, [1, 2], 2)
    cache.evict()
    settle(cache)
    done = cache.insert(ROOT, t, [1, 9], 2)  # a request computed block 1 again
    assert done.adopted == (1,) and cache.match(t, 4).chunks == (1, 9)
    assert tier.usage().used_slots == 0 and not cache.violations()
    cache.evict()
    cache.evict()
    assert settle(cache) and cache.reset() == [] and tier.usage().used_slots == 0


def test_swap_out_takes_precedence_over_spilled_blocks() -> None:
    """A swap-out short of host slots drops spilled prefixes for room (it does not fall
    back to recompute while spilled blocks could make room)."""
    from vtensor.engine.params import SamplingParams
    from vtensor.engine.request import Request
    from vtensor.engine.swap_plan import SwapPlanner
    from vtensor.kvcache.manager import KVCacheManager, KVGeometry
    from vtensor.kvcache.swap_policy import ModelCost, SwapCostModel

    geo = KVGeometry(4, 256, 512, 4096, 64)  # 8 tokens per chunk and block
    tier = SlotHostTier(4)
    kv = KVCacheManager(geo, prefix_cache=SpillRadixCache(8, 1, tier))
    old = tokens(32)
    assert kv.admit(0, 32) is not None
    kv.cache_tokens(0, old, 32)
    kv.release(0)
    assert kv.evict(4) == 4  # the conversation's 4 blocks spill: the tier is full
    for s in kv.take_spills():
        tier.end_out(s.key)
    assert tier.usage().spill_slots == 4
    req = Request.new(1, tokens(24), SamplingParams(max_tokens=8), 40, 0.0)
    assert kv.admit(1, 24) is not None
    req.num_computed = 24  # three private chunks, computed
    cost = SwapCostModel(ModelCost(10**6, 2, 64), 1e9, 1e12, mode="swap")
    plan = SwapPlanner(tier, cost, geo.chunk_size).swap_out(kv, req)
    assert plan is not None and plan.extent.count == 3
    usage = tier.usage()
    assert (usage.requests, usage.spill_blocks) == (1, 1)  # three spilled blocks dropped
    assert kv.cache.stats().host_dropped_blocks == 3 and not kv.violations()
