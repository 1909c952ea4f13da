"""KVCacheManager with the radix prefix cache (torch-free): sharing, slot affinity,
write protection, eviction before preemption, reset, and whole-token blocks."""

from __future__ import annotations

import random

import pytest

from vtensor.engine.kv_setup import prefix_cache_for
from vtensor.kvcache.commands import (
    CacheHoldCommand,
    MapCachedCommand,
    MapCommand,
    UnmapCommand,
)
from vtensor.kvcache.geometry import KVGeometry
from vtensor.kvcache.manager import KVCacheManager, SharedChunkWriteError
from vtensor.kvcache.prefix_cache import NoPrefixCache
from vtensor.kvcache.radix_cache import RadixPrefixCache

CHUNK = 4096
TPC = 8  # 512 bytes per token below: one 8-token block per chunk


def manager(capacity: int = 32, slots: int = 4, keep_idle: int | None = None) -> KVCacheManager:
    geo = KVGeometry(slots, 128, 512, CHUNK, capacity)  # 16 chunks per slot
    return KVCacheManager(geo, keep_idle, prefix_cache=RadixPrefixCache(*geo.cache_block()))


def tokens(n: int) -> list[int]:
    return [random.randrange(1000) for _ in range(n)]


def run(kv: KVCacheManager, rid: int, ids: list[int]) -> int:
    """Admit ``ids`` whole (after its hit), compute it, offer its blocks; the hit."""
    hit = kv.match(ids, len(ids) - 1)
    assert kv.admit(rid, len(ids), hit) is not None
    kv.check_writes([(rid, hit.tokens, len(ids))])
    kv.cache_tokens(rid, ids, len(ids))
    kv.check()
    return hit.tokens


def test_a_hit_shares_the_cached_chunks_at_the_front_of_another_slot() -> None:
    kv = manager()
    a = tokens(5 * TPC)
    assert run(kv, 0, a) == 0
    adopted = [c for c in kv.take_commands() if isinstance(c, CacheHoldCommand)]
    assert adopted == [
        CacheHoldCommand(kv.slots.slot_of(0), 0, kv.slot_table(kv.slots.slot_of(0))[:5])
    ]
    b = [*a[: 3 * TPC + 2], *tokens(10)]  # shares 3 whole blocks (and 2 tokens more)
    assert run(kv, 1, b) == 3 * TPC
    slot_a, slot_b = kv.slots.slot_of(0), kv.slots.slot_of(1)
    shared = kv.slot_table(slot_a)[:3]
    assert kv.slot_table(slot_b)[:3] == shared
    commands = kv.take_commands()
    assert commands[0] == MapCachedCommand(slot_b, 0, shared)  # zero copy: mapped, not computed
    assert commands[1] == MapCommand(slot_b, 3, kv.mapped_chunks(1) - 3)
    assert kv.usage().committed_chunks == 5 + kv.mapped_chunks(1) - 3  # shared chunks once


def test_writing_into_a_shared_or_cached_chunk_is_refused() -> None:
    kv = manager()
    a = tokens(4 * TPC)
    run(kv, 0, a)
    run(kv, 1, [*a, *tokens(5)])  # hits all 4 blocks
    for rid, start, end in [(1, 0, 1), (1, 3 * TPC + 7, 4 * TPC + 1), (0, 2 * TPC, 2 * TPC + 1)]:
        with pytest.raises(SharedChunkWriteError, match="shared or cached"):
            kv.check_writes([(rid, start, end)])
    kv.check_writes([(1, 4 * TPC, 4 * TPC + 5)])  # its own chunk after the hit
    with pytest.raises(SharedChunkWriteError, match="beyond"):
        kv.check_writes([(1, 4 * TPC, 7 * TPC)])  # not mapped


def test_the_idle_slot_of_an_earlier_turn_is_reused_without_remapping() -> None:
    kv = manager()
    for rid in range(3):  # other idle slots, one of them larger (the old best fit)
        run(kv, 10 + rid, tokens(random.randint(1, 7) * TPC))
        kv.release(10 + rid)
    turn1 = tokens(3 * TPC + 4)
    run(kv, 0, turn1)
    kv.grow(0, len(turn1) + 9)  # the answer
    turn1 += tokens(9)
    kv.cache_tokens(0, turn1, len(turn1) - 1)  # the last token was sampled, not computed
    slot = kv.slots.slot_of(0)
    kv.release(0)
    kv.take_commands()
    turn2 = [*turn1, *tokens(6)]
    assert run(kv, 1, turn2) == 4 * TPC
    assert kv.slots.slot_of(1) == slot
    assert not any(isinstance(c, MapCachedCommand | UnmapCommand) for c in kv.take_commands())


def test_premap_shares_a_waiting_requests_hit_into_its_future_slot() -> None:
    kv = manager()
    a = tokens(4 * TPC)
    run(kv, 0, a)
    b = [*a, *tokens(3)]
    hit = kv.match(b, len(b) - 1)
    kv.take_commands()
    kv.premap([len(b)], hits=[hit])
    ahead = kv.take_commands()
    slot = next(c.slot for c in ahead if isinstance(c, MapCachedCommand))
    assert kv.admit(1, len(b), kv.match(b, len(b) - 1)) == slot
    assert kv.take_commands() == []  # everything was mapped a step ahead
    kv.check()


def test_shared_chunks_pinned_by_a_running_request_cost_a_newcomer_nothing() -> None:
    kv = manager(capacity=7, slots=3)
    system = tokens(5 * TPC)
    run(kv, 0, [*system, 1])  # 6 chunks, 5 of them cached and pinned
    b = [*system, *tokens(3)]
    hit = kv.match(b, len(b) - 1)
    assert hit.tokens == 5 * TPC
    assert kv.can_admit(len(b), hit=hit)  # one new chunk: it fits
    assert not kv.can_admit(len(b))  # without the hit it would need 6
    run(kv, 1, b)
    assert kv.usage().committed_chunks == 7


def test_unlocked_blocks_are_evicted_lru_before_growth_fails() -> None:
    kv = manager(capacity=8, slots=4, keep_idle=0)
    seqs = [tokens(2 * TPC) for _ in range(3)]
    for rid, s in enumerate(seqs):
        run(kv, rid, s)
        kv.release(rid)
    kv.match(seqs[0], 2 * TPC)  # seqs[0] becomes the most recently used
    assert kv.usage().cached_chunks == 6 and kv.free_chunks == 2
    run(kv, 9, tokens(4 * TPC))  # needs 4: two free, two evicted (seqs[1], leaves first)
    assert kv.match(seqs[1], 2 * TPC).tokens == 0
    assert kv.match(seqs[2], 2 * TPC).tokens == 2 * TPC
    assert kv.match(seqs[0], 2 * TPC).tokens == 2 * TPC
    assert kv.evicted_chunks == 2
    assert not kv.grow(9, 9 * TPC)  # beyond the pool: refused, nothing changed
    assert kv.grow(9, 8 * TPC)  # evicts everything else
    assert kv.usage().cached_chunks == 4 and kv.evicted_chunks == 6


def test_evicting_a_chunk_an_idle_slot_maps_cuts_that_slot() -> None:
    kv = manager(capacity=6, slots=3)
    a = tokens(4 * TPC)
    run(kv, 0, [*a, 5])
    slot = kv.slots.slot_of(0)
    kv.release(0)  # the idle slot keeps all 5 chunks: 4 cached, 1 private
    b = tokens(TPC)
    run(kv, 1, b)  # the free chunk: no pressure, an empty idle slot
    assert kv.slots.slot_of(1) != slot and kv.free_chunks == 0
    assert kv.grow(1, 3 * TPC)  # the idle slot's private tail, then one block (LRU leaf)
    assert len(kv.slot_table(slot)) == 3  # cut before the evicted block (the last one)
    assert kv.match(a, len(a)).tokens == 3 * TPC and kv.evicted_chunks == 1
    kv.check()


def test_under_pressure_a_new_request_reuses_the_oldest_idle_slots_chunks_in_place() -> None:
    """With no free chunk, a request without a hit takes the idle slot released longest
    ago and evicts that slot's own cache blocks (leaves first) to write over their
    chunks: nothing is unmapped or mapped."""
    kv = manager(capacity=8, slots=3)
    old, new = tokens(4 * TPC), tokens(4 * TPC)
    for rid, ids in enumerate((old, new)):
        run(kv, rid, ids)
    slot = kv.slots.slot_of(0)
    kv.release(0)
    kv.release(1)  # all 8 chunks cached and kept by the two idle slots
    kv.take_commands()
    run(kv, 2, tokens(3 * TPC + 2))
    assert kv.slots.slot_of(2) == slot
    commands = kv.take_commands()
    assert not any(isinstance(c, MapCommand | UnmapCommand | MapCachedCommand) for c in commands)
    assert kv.match(old, len(old)).tokens == 0  # the older content went
    assert kv.match(new, len(new)).tokens == 4 * TPC
    kv.check()


def test_a_reset_is_refused_while_requests_run_and_then_frees_everything() -> None:
    kv = manager()
    run(kv, 0, tokens(3 * TPC))
    kv.take_commands()
    before = kv.usage()
    assert not kv.reset_prefix_cache() and kv.usage() == before
    kv.release(0)
    assert kv.reset_prefix_cache()
    assert kv.usage().committed_chunks == 0 and kv.usage().cached_chunks == 0
    commands = kv.take_commands()
    assert isinstance(commands[0], UnmapCommand) and commands[-1].chunks  # type: ignore[union-attr]


def test_blocks_span_several_chunks_when_a_chunk_splits_a_token() -> None:
    """1536 bytes per token, 4096-byte chunks: only every 8 tokens (3 chunks) does a
    chunk boundary fall between tokens, so the cache shares 8-token, 3-chunk blocks."""
    bpt = 1536
    max_tokens = KVGeometry.aligned_max_tokens(60, bpt, CHUNK)
    geo = KVGeometry(3, max_tokens, bpt, CHUNK, 40)
    assert geo.cache_block() == (8, 3)
    kv = KVCacheManager(geo, prefix_cache=RadixPrefixCache(8, 3))
    a = tokens(21)
    run(kv, 0, a)
    b = [*a[:20], *tokens(9)]
    hit = kv.match(b, len(b) - 1)
    assert hit.tokens == 16 and len(hit.chunks) == 6  # two whole blocks
    kv.admit(1, len(b), hit)
    assert kv.slot_table(kv.slots.slot_of(1))[:6] == kv.slot_table(kv.slots.slot_of(0))[:6]
    kv.check_writes([(1, 16, 17)])  # token 16 starts chunk 6 exactly: its own
    with pytest.raises(SharedChunkWriteError):
        kv.check_writes([(1, 15, 16)])
    kv.check()


def test_caching_is_off_with_a_reason_when_no_block_fits_a_slot() -> None:
    geo = KVGeometry(2, 8, 1536, CHUNK, 10)  # blocks of 8 tokens: a whole slot
    cache, reason = prefix_cache_for(geo, True)
    assert isinstance(cache, NoPrefixCache) and reason and "slot" in reason
    cache, reason = prefix_cache_for(geo, False)
    assert isinstance(cache, NoPrefixCache) and "disabled" in (reason or "")
    ok, none = prefix_cache_for(KVGeometry(2, 16, 1536, CHUNK, 10), True)
    assert isinstance(ok, RadixPrefixCache) and none is None
    with pytest.raises(ValueError, match="blocks must be"):
        KVCacheManager(geo, prefix_cache=RadixPrefixCache(4, 1))


def test_past_the_watermark_an_idle_slot_keeps_its_cached_blocks_mapped() -> None:
    """Idle reclamation counts only what idle slots hold beyond the cache: a finished
    request's slot loses its private tail to the watermark but keeps its cached blocks
    mapped, so the next turn of its conversation finds its history there, unmapped
    nothing and remapped nothing."""
    kv = manager(capacity=32, slots=4, keep_idle=0)
    blocks = random.randint(2, 5)
    first = tokens(blocks * TPC + random.randint(1, TPC - 1))  # whole blocks + a private tail
    run(kv, 0, first)
    slot = kv.slots.slot_of(0)
    kv.take_commands()
    kv.release(0)
    unmapped = [c for c in kv.take_commands() if isinstance(c, UnmapCommand)]
    assert [(c.slot, c.first, c.count) for c in unmapped] == [(slot, blocks, 1)]
    assert len(kv.slot_table(slot)) == blocks and kv.usage().idle_chunks == 0
    nxt = [*first, *tokens(TPC)]
    assert run(kv, 1, nxt) == blocks * TPC and kv.slots.slot_of(1) == slot
    assert not [c for c in kv.take_commands() if isinstance(c, (UnmapCommand, MapCachedCommand))]
    kv.check()
