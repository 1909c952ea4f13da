"""Bounded deferred reclamation in the KV manager (kvcache/idle_reclaim.py), applied to a
real arena and pool: idle slots lose their chunks past the watermark or their idle time,
and the pool releases its free chunks to the driver (host: the memfd's pages go back)."""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.idle_policy import ManualClock
from vtensor.kvcache.layout import KVLayout
from vtensor.kvcache.manager import KVCacheManager, ReleaseFreeCommand, UnmapCommand
from vtensor.kvcache.prefix_cache import PrefixCache
from vtensor.kvcache.radix_cache import RadixPrefixCache
from vtensor.memory import ChunkPool
from vtensor.memory.host import HostBackend


def build(
    pool: ChunkPool,
    watermark: int,
    timeout: float | None,
    cached: bool = False,
    cache_budget: int | None = None,
) -> tuple[KVArena, KVCacheManager, ManualClock, int]:
    tokens_per_chunk = pool.chunk_size // 512  # 512 B per token below
    layout = KVLayout(6, 8 * tokens_per_chunk, 2, 2, 32, torch.float32)
    arena = KVArena(layout, pool, pool.backend.device)
    clock = ManualClock(100.0)
    cache: PrefixCache | None = None
    if cached:
        cache = RadixPrefixCache(*arena.geometry.cache_block())
    kv = KVCacheManager(
        arena.geometry,
        watermark,
        idle_timeout_s=timeout,
        clock=clock,
        prefix_cache=cache,
        cache_budget_chunks=cache_budget,
    )
    geo = arena.geometry
    return arena, kv, clock, geo.chunk_size // geo.bytes_per_token


def sync(arena: KVArena, kv: KVCacheManager) -> None:
    arena.apply(kv.take_commands())
    arena.wait_all()


def resident(pool: ChunkPool) -> int | None:
    b = pool.backend
    return b.resident_bytes() if isinstance(b, HostBackend) else None


def test_idle_time_unmaps_and_releases_to_the_driver(
    make_pool: Callable[[int], ChunkPool],
) -> None:
    pool = make_pool(48)
    arena, kv, clock, tpc = build(pool, watermark=48, timeout=2.0)
    sizes = [random.randint(1, 8 * tpc) for _ in range(3)]
    for rid, n in enumerate(sizes):
        assert kv.admit(rid, n) is not None
    sync(arena, kv)
    for rid in range(3):
        arena.views[0][0][kv.slots.slot_of(rid) * arena.layout.max_tokens].fill_(1.0)  # touch pages
    mapped = sum(kv.mapped_chunks(r) for r in range(3))
    for rid in range(3):
        clock.advance(0.5)
        kv.release(rid)
    sync(arena, kv)
    assert kv.usage().idle_chunks == mapped and pool.stats().created == mapped
    clock.advance(0.9)  # the first slot has been idle 1.9 s
    assert kv.reclaim_idle() == 0 and kv.take_commands() == []
    clock.advance(0.1)  # 2.0 s: the first slot's time is up, not the others'
    first = kv.geometry.chunks_for(sizes[0])
    assert kv.reclaim_idle() == first
    commands = kv.take_commands()
    assert commands[-1] == ReleaseFreeCommand(0)
    assert all(isinstance(c, UnmapCommand) for c in commands[:-1])
    arena.apply(commands)
    arena.wait_all()
    s = pool.stats()
    assert s.free == 0 and s.created == mapped - first and s.released == first
    clock.advance(1.0)
    assert kv.reclaim_idle() == mapped - first
    sync(arena, kv)
    s = pool.stats()
    assert s.created == 0 and s.released == mapped and kv.usage().idle_chunks == 0
    if resident(pool) is not None:
        assert resident(pool) == 0  # the touched pages really went back
    kv.check()
    arena.close()


def test_watermark_binds_at_release_and_keeps_the_newest(
    make_pool: Callable[[int], ChunkPool],
) -> None:
    pool = make_pool(48)
    arena, kv, clock, tpc = build(pool, watermark=5, timeout=None)
    for rid in range(4):
        kv.admit(rid, 4 * tpc)  # 4 chunks each
    sync(arena, kv)
    slots = [kv.slots.slot_of(rid) for rid in range(4)]
    for rid in range(4):
        clock.advance(1.0)
        kv.release(rid)
        assert kv.usage().idle_chunks <= 5
    # The last slot released keeps all 4, the one before it 1; older ones nothing.
    kept = sorted(len(kv.slot_table(s)) for s in kv.slots.idle_slots())
    assert kept == [0, 0, 0, 0, 1, 4]
    assert [len(kv.slot_table(s)) for s in slots] == [0, 0, 1, 4]
    sync(arena, kv)
    assert pool.stats().created == 5 and pool.stats().free == 0
    clock.advance(1e6)
    assert kv.reclaim_idle() == 0  # no idle time limit
    kv.check()
    arena.close()


def test_random_operations_stay_bounded_and_return_to_the_floor(
    make_pool: Callable[[int], ChunkPool],
) -> None:
    """Random admit/grow/cache/release/time; after every operation the books check, the
    idle slots keep at most the watermark, and none keeps chunks beyond the cache's
    past its idle time (its cached blocks may stay mapped: they hold no memory of their
    own). At the end, past the idle time, the pool holds only the cache's chunks."""
    rng = random.Random()
    pool = make_pool(40)
    watermark, timeout = rng.randint(0, 12), rng.choice([0.0, 0.5, 2.0])
    budget = rng.choice([None, rng.randint(0, 10)])
    arena, kv, clock, tpc = build(pool, watermark, timeout, rng.random() < 0.7, budget)
    vocab = 5  # few token ids: prompts share prefixes, so the cache hits
    live: dict[int, list[int]] = {}
    for step in range(250):
        op = rng.random()
        if op < 0.3 and kv.slots.has_free_slot():
            ids = [rng.randrange(vocab) for _ in range(rng.randint(2, 6 * tpc))]
            hit = kv.match(ids, len(ids) - 1)
            if kv.admit(step, len(ids), hit) is not None:
                live[step] = ids
        elif op < 0.55 and live:
            rid = rng.choice(list(live))
            ids = live[rid]
            ids += [rng.randrange(vocab) for _ in range(rng.randint(1, tpc))]
            ids[:] = ids[: arena.layout.max_tokens]
            if kv.grow(rid, len(ids)):
                kv.cache_tokens(rid, ids, len(ids))
        elif op < 0.8 and live:
            rid = rng.choice(list(live))
            del live[rid]
            kv.release(rid)
            if budget is not None:  # over it only by blocks running requests lock
                assert kv.books.cached_count <= max(budget, len(kv.cache.locked_chunk_ids()))
        else:
            clock.advance(rng.choice([0.1, 0.3, 1.0, 2.5]))
            kv.reclaim_idle()
            for slot in kv.slots.idle_slots():
                since = kv.idle._since.get(slot, 0.0)
                assert not kv.books.uncached(slot) or clock() - since < timeout
        assert kv.usage().idle_chunks <= watermark
        kv.check()
        sync(arena, kv)
        s = pool.stats()
        assert s.balanced and s.in_use == kv.books.committed
    for rid in list(live):
        kv.release(rid)
    clock.advance(timeout + 0.01)
    kv.reclaim_idle()
    sync(arena, kv)
    s = pool.stats()
    assert kv.usage().idle_chunks == 0
    assert s.free == 0 and s.created == kv.books.cached_count
    assert budget is None or kv.books.cached_count <= budget
    kv.reset_prefix_cache()
    sync(arena, kv)
    kv.check()
    arena.close()


def test_no_watermark_below_the_budget_and_no_idle_time_never_release(
    make_pool: Callable[[int], ChunkPool],
) -> None:
    """Reclamation off (a preallocating engine): chunks freed by cutting idle slots stay
    in the pool; no release is ever asked for."""
    pool = make_pool(48)
    arena, kv, clock, tpc = build(pool, watermark=1 << 20, timeout=None)
    for rid in range(3):
        kv.admit(rid, random.randint(1, 8 * tpc))
    sync(arena, kv)
    for rid in range(3):
        kv.release(rid)
    kv.reclaim_all()  # frees every idle chunk into the pool
    clock.advance(1e6)
    kv.reclaim_idle()
    commands = kv.take_commands()
    assert commands and not any(isinstance(c, ReleaseFreeCommand) for c in commands)
    arena.apply(commands)
    arena.wait_all()
    s = pool.stats()
    assert s.released == 0 and s.free == s.created > 0
    arena.close()
