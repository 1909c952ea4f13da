"""KVCacheManager bookkeeping (torch-free), and its commands applied to a real arena."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.layout import KVLayout
from vtensor.kvcache.manager import (
    KVCacheManager,
    KVGeometry,
    MapCommand,
    ReleaseFreeCommand,
    UnmapCommand,
)
from vtensor.memory import ChunkPool, MapperOp

CHUNK = 4096


def geometry(
    slots: int = 4, capacity: int = 16, max_tokens: int = 64, bpt: int = 512
) -> KVGeometry:
    return KVGeometry(slots, max_tokens, bpt, CHUNK, capacity)  # 8 tokens per chunk


def test_aligned_max_tokens_makes_whole_chunks() -> None:
    for bpt in (512, 57344, 131072, 3 * 4096 + 1024):
        m = KVGeometry.aligned_max_tokens(100, bpt, 2 << 20)
        assert m >= 100 and m * bpt % (2 << 20) == 0
    with pytest.raises(ValueError, match="whole number of chunks"):
        KVGeometry(1, 3, 1000, CHUNK, 4)


def test_admit_grow_release_emit_ordered_commands() -> None:
    kv = KVCacheManager(geometry())
    assert kv.admit(7, 10) is not None  # 10 tokens -> 2 chunks
    assert kv.take_commands() == [MapCommand(kv.slots.slot_of(7), 0, 2)]
    assert kv.grow(7, 16) and kv.take_commands() == []  # still 2 chunks
    assert kv.grow(7, 17) and kv.take_commands() == [MapCommand(kv.slots.slot_of(7), 2, 1)]
    assert kv.mapped_chunks(7) == 3 and kv.free_chunks == 13
    kv.release(7)
    # Deferred reclamation keeps them.
    assert kv.usage().idle_chunks == 3 and kv.take_commands() == []
    kv.check()


def test_best_fit_reuses_an_idle_slot_without_mapping() -> None:
    kv = KVCacheManager(geometry())
    for rid, tokens in ((0, 40), (1, 8), (2, 20)):
        kv.admit(rid, tokens)
    slots = {rid: kv.slots.slot_of(rid) for rid in range(3)}
    for rid in range(3):
        kv.release(rid)
    kv.take_commands()
    kv.admit(9, 17)  # 3 chunks: the 20-token slot (3 chunks) fits best
    assert kv.slots.slot_of(9) == slots[2] and kv.take_commands() == []
    kv.check()


def test_growth_steals_idle_chunks_unmapping_before_mapping() -> None:
    kv = KVCacheManager(geometry(capacity=8))
    kv.admit(0, 64)  # all 8 chunks
    kv.release(0)
    kv.take_commands()
    assert kv.admit(1, 8) is not None
    # The new request takes the idle slot itself (best fit: the largest), no command needed,
    # and holds 7 chunks of surplus...
    assert kv.take_commands() == [] and kv.usage().surplus_chunks == 7
    assert kv.admit(2, 8) is not None  # ...which the next one takes: unmap first, then map
    unmap_then_map = [
        UnmapCommand(kv.slots.slot_of(1), 7, 1),
        MapCommand(kv.slots.slot_of(2), 0, 1),
    ]
    assert kv.take_commands() == unmap_then_map
    assert kv.usage().surplus_chunks == 6
    kv.check()


def test_exhausted_pool_refuses_without_changing_state() -> None:
    kv = KVCacheManager(geometry(capacity=4))
    kv.admit(0, 32)  # 4 chunks
    kv.take_commands()
    before = kv.usage()
    assert not kv.can_admit(8)
    assert kv.admit(1, 8) is None
    assert not kv.grow(0, 40)
    assert kv.usage() == before and kv.take_commands() == []
    kv.check()


def test_keep_idle_limit_unmaps_the_excess() -> None:
    kv = KVCacheManager(geometry(), keep_idle_chunks=2)
    kv.admit(0, 40)  # 5 chunks
    kv.take_commands()
    kv.release(0)
    # The excess is unmapped, then the pool releases its free chunks (none runs: all).
    assert kv.take_commands() == [UnmapCommand(0, 2, 3), ReleaseFreeCommand(0)]
    assert kv.usage().idle_chunks == 2
    kv.check()


def test_random_operations_keep_invariants_and_real_pool_in_step(make_pool) -> None:
    """Random admit/grow/release; the commands, applied to a real arena, match the books."""
    pool: ChunkPool = make_pool(24)
    tokens_per_chunk = pool.chunk_size // 512  # 512 B per token below
    layout = KVLayout(6, 8 * tokens_per_chunk, 2, 2, 32, torch.float32)
    arena = KVArena(layout, pool, pool.backend.device)
    kv = KVCacheManager(arena.geometry, keep_idle_chunks=random.randint(0, 24))
    rng = random.Random()
    live: dict[int, int] = {}
    for step in range(300):
        op = rng.random()
        if op < 0.3 and kv.slots.has_free_slot():
            tokens = rng.randint(1, layout.max_tokens)
            if kv.admit(step, tokens) is not None:
                live[step] = tokens
        elif op < 0.7 and live:
            rid = rng.choice(list(live))
            live[rid] = min(layout.max_tokens, live[rid] + rng.randint(1, 3 * tokens_per_chunk))
            kv.grow(rid, live[rid])
        elif live:
            rid = rng.choice(list(live))
            del live[rid]
            kv.release(rid)
        kv.check()
        arena.apply(kv.take_commands())
        if step % 50 == 0:
            arena.wait_all()
            assert arena.vt.mapped_chunks == kv.usage().committed_chunks
    for rid in list(live):
        kv.release(rid)
    kv.reclaim_all()
    arena.apply(kv.take_commands())
    arena.wait_all()
    assert arena.vt.mapped_chunks == 0 and pool.stats().in_use == 0
    arena.close()


class _Gate(MapperOp):
    """A mapper op that holds the mapper thread until the test opens the gate."""

    def __init__(self, gate: threading.Event) -> None:
        self.gate = gate

    def apply(self) -> int:
        self.gate.wait(10)
        return 0


def test_a_step_waits_only_for_the_chunks_it_touches(make_pool) -> None:
    """Mapping queued for slot 2 (ahead of need) must not hold up a step on slot 1."""
    pool: ChunkPool = make_pool(24)
    tokens_per_chunk = pool.chunk_size // 512
    layout = KVLayout(4, 4 * tokens_per_chunk, 2, 2, 32, torch.float32)
    arena = KVArena(layout, pool, pool.backend.device)
    arena.apply([MapCommand(1, 0, 1)])
    arena.wait_all()  # slot 1's first chunk is mapped
    gate = threading.Event()
    arena.mapper.submit([_Gate(gate)])
    arena.apply([MapCommand(2, 0, 2)])  # queued behind the gate
    t0 = time.perf_counter()
    arena.wait_ready([(1, 1)])
    assert time.perf_counter() - t0 < 1.0 and arena.stats().waits == 0
    threading.Timer(0.2, gate.set).start()
    arena.wait_ready([(2, 2)])  # this one must wait, and it is counted
    stats = arena.stats()
    assert stats.waits == 1 and stats.wait_s >= 0.1
    assert arena.vt.mapped_chunks == 3
    arena.apply([UnmapCommand(1, 0, 1), UnmapCommand(2, 0, 2)])
    arena.close()
