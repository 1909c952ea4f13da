"""Running requests' links to the prefix cache (torch-free; part of the KV manager,
whose books it changes).

Each running request locks one cached prefix: its hit at admission, then the
longer prefix that the whole blocks it computes extend it to (``offer``). A lock
pins the prefix's chunks (the blocks and their ancestors), so no reclaim evicts
what a running request reads; ``unlink`` unlocks it when the request ends or is
preempted. A hit's blocks that live on the host tier are restored into chunks
of the request's slot, and wait here until the engine takes their copy-ins.

Invariant: a request has a path here exactly while it owns a slot
(``manager_checks.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from vtensor.intervals import runs

from .host_tier import HostExtent
from .prefix_cache import CachePath, PrefixMatch

if TYPE_CHECKING:
    from .manager import KVCacheManager

_NEVER = 1 << 62  # no request has this many tokens


class CacheLinks:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.paths: dict[int, CachePath] = {}  # request id -> its locked cache prefix
        self._next_block_end: dict[int, int] = {}  # request id -> tokens filling its next block
        self._restores: list[tuple[int, HostExtent]] = []  # (slot, extent): copy-ins to make

    def link(self, rid: int, hit: PrefixMatch) -> None:
        """Request ``rid`` (being admitted) locks its hit, before any reclaim can evict it."""
        cache = self.kv.cache
        self.paths[rid] = hit.path
        if cache.enabled:
            self._next_block_end[rid] = (hit.path.blocks + 1) * cache.block_tokens
        self.kv.books.pin(cache.lock(hit.path), +1)

    def unlink(self, rid: int) -> None:
        """The request is done (or preempted): its cache blocks are unlocked."""
        self._next_block_end.pop(rid, None)
        self.kv.books.pin(self.kv.cache.unlock(self.paths.pop(rid)), -1)

    def restore(self, slot: int, hit: PrefixMatch) -> None:
        """The hit's host blocks take the chunks just mapped at their indices (private,
        fresh or kept by the slot); the engine copies them in (``take_restores``)."""
        books, cache = self.kv.books, self.kv.cache
        first = len(hit.chunks)
        ids = books.tables[slot][first : first + hit.restore * cache.block_chunks]
        self._restores.extend((slot, e) for e in cache.restore(hit.path, ids))
        books.hold(slot, first, ids)
        books.pin(ids, +1)  # their blocks are locked: the lock pinned none on the host

    def take_restores(self) -> list[tuple[int, HostExtent]]:
        """``(slot, extent)`` of each block restored since the last take: copy the
        extent's host slots into the slot's chunks from ``extent.first`` before the
        step's forward pass, then end the tier's copy-in."""
        restores, self._restores = self._restores, []
        return restores

    def offer(self, rid: int, token_ids: Sequence[int], num_tokens: int) -> None:
        """Offer the cache the whole blocks of ``rid``'s first ``num_tokens`` tokens:
        tokens whose KV is computed (or queued) and whose ids the host has read, never a
        placeholder. Blocks already offered are skipped; the request then locks the
        longer cached prefix."""
        if num_tokens < self._next_block_end.get(rid, _NEVER):
            return  # the fast path of every step: no new whole block
        kv, cache, books = self.kv, self.kv.cache, self.kv.books
        path = self.paths[rid]
        blocks = num_tokens // cache.block_tokens
        slot = kv.slots.slot_of(rid)
        table = books.tables[slot]
        if blocks * cache.block_chunks > kv.slots.asked(slot):
            raise ValueError(f"request {rid}: {num_tokens} tokens offered beyond its chunks")
        done = cache.insert(path, token_ids, table, blocks)
        c = cache.block_chunks
        for j, n in runs(done.adopted):  # one command per run of adopted blocks
            books.hold(slot, j * c, table[j * c : (j + n) * c])
        books.pin(cache.lock(done.path, base=path), +1)
        self.paths[rid] = done.path
        self._next_block_end[rid] = (blocks + 1) * cache.block_tokens

    def evict_to_free(self, chunks: int, keep: Sequence[PrefixMatch]) -> int:
        """Evict least recently used (unlocked) cache blocks, never those of ``keep``,
        until ``chunks`` are free or none is left; returns the chunks freed. The
        scheduler calls it for what the next step may take, so that a pool the cache
        has filled frees chunks while the GPU computes, not in the step that needs them."""
        kv, cache = self.kv, self.kv.cache
        short = chunks - kv.free_chunks
        if short <= 0 or not cache.enabled:
            return 0
        for hit in keep:  # held for the call only: a lock pins, and pins block eviction
            kv.books.pin(cache.lock(hit.path), +1)
        try:
            return kv.evict(short)
        finally:
            for hit in keep:
                kv.books.pin(cache.unlock(hit.path), -1)
