"""Slot placement: which idle slot a request takes, and how its front is fitted to its
cache hit (torch-free; part of the KV manager, whose books it changes).

* **Slot affinity.** An idle slot that already maps the start of the hit (the
  slot of a conversation's previous turn, or one premapped for this request)
  is taken first: the chunks it maps stay, nothing is remapped.
* Otherwise the **best fit** on reusable chunks: an idle slot's leading private
  chunks can be written over in place; among equals, the slot with the fewest
  mappings (cached blocks kept for a later turn are left alone).
* **Fitting the front.** The slot then maps the hit's chunks at its front
  (``map_cached`` replaces what differs) and keeps what follows only while it
  is private: a cached or shared chunk after the hit is unmapped, because the
  request will write there.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING

from .prefix_cache import NO_MATCH, PrefixMatch

if TYPE_CHECKING:
    from .manager import KVCacheManager


class SlotPlacer:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv

    def place(self, rid: int, want: int, hit: PrefixMatch) -> int:
        """Admit request ``rid`` (``want`` chunks, ``hit`` cached) into the idle slot
        ``choose`` picks: it takes the slot and locks its hit, the front is fitted, and
        it asks for what the slot then maps (up to ``want``). Returns the slot."""
        kv = self.kv
        pressure = want - len(hit.chunks) > kv.capacity.free
        slot = self.choose(want, hit.chunks, kv.slots.idle_slots(), pressure)
        kv.slots.take(rid, slot)
        kv.links.link(rid, hit)  # locked before anything below may evict (convert, reclaim)
        self.fit_front(slot, hit.chunks, convert=pressure)
        kv.slots.set_asked(slot, min(want, len(kv.books.tables[slot])))
        return slot

    def premap(
        self,
        token_counts: Sequence[int],
        headroom_chunks: int = 0,
        hits: Sequence[PrefixMatch] | None = None,
    ) -> None:
        """Map idle slots ahead for requests expected next (the head of the waiting
        queue, ``token_counts`` each, their cache ``hits``), so their admission finds
        the chunks mapped and the step that admits them does not wait on the mapper.
        Cached chunks are shared into the slot; fresh ones come only from free chunks
        (leaving ``headroom_chunks`` free, nothing reclaimed), within
        ``keep_idle_chunks``. The slots stay idle: all of it stays reclaimable."""
        taken: set[int] = set()
        idle = self.kv.slots.idle_slots()
        for i, tokens in enumerate(token_counts):
            hit = hits[i] if hits is not None else NO_MATCH
            candidates = idle - taken
            if not candidates:
                return
            want = self.kv.geometry.chunks_for(tokens)
            pressure = want - len(hit.chunks) > self.kv.free_chunks
            slot = self.choose(want, hit.chunks, candidates, pressure)  # as admit() does
            taken.add(slot)
            table = self.kv.books.tables[slot]
            fitted = max(len(hit.chunks), self.kept_end(slot, hit.chunks))
            need = max(0, want - fitted)
            if pressure:
                self.fit_front(slot, hit.chunks, convert=True)  # no free chunk needed
                fitted = len(table)
                need = max(0, want - fitted)
            short = need + headroom_chunks - self.kv.free_chunks
            if short > 0 and self.kv.capacity.lease is not None:
                self.kv.capacity.lease.top_up(short)  # unallocated chunks only: nothing reclaimed
            if need > self.kv.free_chunks - headroom_chunks:
                return
            if self.kv.slots.idle_chunks + need > self.kv.keep_idle_chunks:
                return  # the fresh chunks would sit in an idle slot past the watermark
            self.fit_front(slot, hit.chunks)
            if need:
                self.kv.books.map_fresh(slot, need)
            self.kv.idle.touch(slot)  # mapped ahead: its idle time starts now

    def choose(
        self, want: int, hit: tuple[int, ...], among: AbstractSet[int], pressure: bool = False
    ) -> int:
        """The idle slot that maps the longest part of ``hit`` already (slot affinity:
        a conversation's previous turn); else one whose private chunks cover ``want``
        (the smallest); else, under ``pressure`` (not enough free chunks), the idle slot
        released longest ago that maps cached blocks, whose chunks it will reuse in
        place (``fit_front(convert=True)``); else the largest private run. Among
        equals, the one with the fewest mappings to undo (an idle slot holding cached
        blocks may serve a later turn of its conversation)."""
        books = self.kv.books
        tables = books.tables
        if hit:
            near = books.holders(hit[0]) & among
            if near:
                return max(near, key=lambda s: (_common(tables[s], hit), -s))
        run = books.private_run
        covering = [s for s in among if run(s) >= want]
        if covering:
            return min(covering, key=lambda s: (run(s), len(tables[s]), s))
        if pressure:  # reuse the least recently used content's slot in place
            aged = [s for s in among if books.cached_end[s]]
            if aged:
                return min(aged, key=lambda s: (self._leaf_use(s), self.kv.slots.released_at(s), s))
        return max(among, key=lambda s: (run(s), -len(tables[s]), -s))

    def _leaf_use(self, slot: int) -> int:
        """When the slot's deepest cached block was last used (the first that
        ``convert_in_place`` would evict); -1 if unknown."""
        books, cache = self.kv.books, self.kv.cache
        first = books.cached_end[slot] - max(1, cache.block_chunks)
        table = books.tables[slot]
        return cache.last_use(table[first]) if 0 <= first < len(table) else -1

    def kept_end(self, slot: int, hit: tuple[int, ...]) -> int:
        """How far the slot's entries from ``len(hit)`` on may stay: while private."""
        table, books = self.kv.books.tables[slot], self.kv.books
        end = len(hit)
        if books.private_run(slot) >= len(table):
            return max(end, len(table))
        while end < len(table) and books.is_private(table[end]):
            end += 1
        return end

    def fit_front(self, slot: int, hit: tuple[int, ...], convert: bool = False) -> None:
        """Make the slot map ``hit`` at its front, then only private chunks: entries that
        already match stay (no remapping), the rest of the front is replaced by the
        cached chunks, and what follows is kept while private, unmapped from the
        first shared or cached entry on. With ``convert`` (under pressure) cached
        blocks that only this slot maps are first evicted in place, in LRU order, to
        be kept as private chunks (``Reclaimer.convert_in_place``)."""
        if convert:
            self.kv.convert_in_place(slot, len(hit))
        table = self.kv.books.tables[slot]
        end = self.kept_end(slot, hit)
        if end < len(table):
            self.kv.books.truncate(slot, end)
        k = _common(table, hit)
        if k < len(hit):
            self.kv.books.map_cached(slot, k, hit[k:])


def _common(table: Sequence[int], hit: Sequence[int]) -> int:
    """Length of the common prefix of a slot table and a hit's chunks."""
    n = min(len(table), len(hit))
    k = 0
    while k < n and table[k] == hit[k]:
        k += 1
    return k
