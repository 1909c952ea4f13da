"""Reclaim: free chunks that nothing pins, cheapest loss first (torch-free).

Part of the KV manager (it reads and changes the manager's books). To make
room (``make_room``) the manager takes its free chunks first, then, on a shared
budget (``shared_budget.py``), what its lease can pull; then chunks are freed
in this order, all of it before the scheduler preempts a running request:

1. **private tails** of idle slots (largest first) and of running slots' surplus:
   chunks no one else holds and no cache block keeps, so nothing cached is lost;
2. **cache blocks**, least recently used first and leaves first (``cache.evict``);
   an idle slot that maps an evicted chunk is cut back to just before it, so the
   chunk is really freed (a running request never maps an unlocked block's chunk
   below what it asked for: its own blocks are locked);
3. whatever idle slots and surplus still hold behind a chunk that someone else
   keeps (another slot, a locked block): they are cut back entirely.

What the phases can free is exactly ``committed - pinned``, the manager's
``KVCapacity.reclaimable``: a reclaim that the manager checked against it never
falls short (it raises, a bug, if it does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manager import KVCacheManager


class Reclaimer:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.evicted_chunks = 0  # chunks of evicted cache blocks, over its life

    def make_room(self, need: int, steal: bool) -> bool:
        """Make ``need`` chunks free. Own free chunks; on a shared budget, then the
        unallocated budget and the grant other engines do not use; then (``steal``)
        reclaimable chunks: the other engines' first when ours do not cover the
        shortfall, then ours. False if it falls short (chunks reclaimed so far stay
        freed: they were reclaimable, nothing is lost)."""
        kv, lease = self.kv, self.kv.capacity.lease
        if need > kv.free_chunks and lease is not None:
            lease.pull(need - kv.free_chunks, reclaim=False)
        short = need - kv.free_chunks
        if short <= 0:
            return True
        if not steal:
            return False
        if lease is not None and short > kv.capacity.reclaimable:
            lease.pull(short - kv.capacity.reclaimable, reclaim=True)
            short = need - kv.free_chunks
        return short <= 0 or self.reclaim(short)

    def reclaim_up_to(self, chunks: int) -> int:
        """Free up to ``chunks`` reclaimable chunks; returns how many."""
        n = min(chunks, self.kv.capacity.reclaimable)
        if n > 0 and not self.reclaim(n):
            raise RuntimeError("reclaim fell short of the reclaimable chunks: a bug")
        return max(0, n)

    def reclaim(self, need: int) -> bool:
        """Free ``need`` chunks; False (nothing done) if fewer are reclaimable."""
        if need > self.kv.capacity.reclaimable:
            return False
        freed = self._cut_tails(need, private_only=True)
        if freed < need:
            freed += self.evict(need - freed)
        if freed < need:
            freed += self._cut_tails(need - freed, private_only=False)
        if freed < need:
            raise RuntimeError(f"reclaim freed {freed} of {need} reclaimable chunks: a bug")
        return True

    def evict(self, chunks: int) -> int:
        """Evict least recently used cache blocks until ``chunks`` are freed (or none is
        left to evict); returns the chunks freed."""
        kv, books = self.kv, self.kv.books
        idle = kv.slots.idle_slots()
        freed = 0
        while freed < chunks:
            ids = kv.cache.evict()
            if ids is None:
                break
            for cid in ids:  # cut every idle slot back to just before the chunk
                for slot in books.holders(cid):
                    if slot not in idle:
                        raise RuntimeError(f"evicted chunk {cid} is mapped by running slot {slot}")
                    freed += books.truncate(slot, books.index_of(cid))
            freed += books.drop(ids)
            self.evicted_chunks += len(ids)
        return freed

    def convert_in_place(self, slot: int, start: int) -> int:
        """Under pressure, for a request taking idle ``slot``: evict the cache blocks that
        only this slot maps, from its deepest one back to chunk ``start`` (after the
        request's own hit), leaves first, but keep their chunks mapped, private now:
        the request writes over them in place, so nothing is unmapped and remapped.
        Stops at a block another slot maps, a locked block, or one that is not a leaf.
        Returns the chunks kept."""
        cache, books = self.kv.cache, self.kv.books
        table, c = books.tables[slot], max(1, cache.block_chunks)
        kept, i = 0, len(table)
        while i > start:
            cid = table[i - 1]
            if books.is_private(cid):
                i -= 1
                continue
            first = i - c  # a cached chunk ends its block: blocks are whole in a slot
            ids = table[first:i]
            if first < start or any(books.holders(x) != {slot} for x in ids):
                break
            if not cache.evict_block(ids[0]):
                break
            books.drop(ids)  # mapped by the slot alone: nothing freed
            kept, i = kept + c, first
        if kept:
            books.refresh_bounds(slot)
            self.evicted_chunks += kept
        return kept

    def _cut_tails(self, need: int, private_only: bool) -> int:
        """Cut idle slots (largest first) and running slots' surplus from the tail until
        ``need`` chunks are freed; with ``private_only`` stop at a chunk that another
        holder keeps (the cut would lose a mapping and free nothing)."""
        kv, books = self.kv, self.kv.books
        tables, is_private = books.tables, books.is_private
        idle = [s for s in kv.slots.idle_slots() if tables[s]]
        if private_only:  # only slots whose last chunk is private have anything to give
            idle = [s for s in idle if is_private(tables[s][-1])]
        idle.sort(key=lambda s: -len(tables[s]))
        surplus = [
            (s, kv.slots.asked(s))
            for s in kv.slots.owners().values()
            if len(tables[s]) > kv.slots.asked(s)
        ]
        freed = 0
        for slot, floor in [*((s, 0) for s in idle), *surplus]:
            if freed >= need:
                break
            table = tables[slot]
            cut, gain = len(table), 0
            while cut > floor and gain < need - freed:
                private = is_private(table[cut - 1])
                if private_only and not private:
                    break
                cut -= 1
                gain += private
            freed += books.truncate(slot, cut)
        return freed
