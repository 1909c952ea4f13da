"""ChunkBooks: which chunk each slot position maps, and who holds each chunk.

Torch-free. Every chunk in use has a logical id (an int, never reused). A slot's
*table* lists the ids it maps at chunk indices ``0, 1, ...`` (always a prefix of
the slot: no holes). A chunk's holders are the slots that map it (each at the
same index: a chunk holds fixed token positions) and the prefix cache; its pool
reference count is their number. Each primitive below changes the books and
emits the matching KV command, so the pool follows once the arena applies them.

*Pins* say what no reclaim may take: a chunk is pinned while a running request
needs it (its slot maps it below the request's ``asked`` chunks) or while its
cache block is locked. ``pinned`` counts the chunks with a pin, so
``capacity - pinned`` is what the pool can still give (free + reclaimable).

Invariants (``violations``): ``committed`` == live ids (mapped or cached);
``pinned`` == ids with a pin; a chunk mapped by two slots is cached (sharing only
ever comes from the cache); each id maps at one index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .commands import (
    CacheDropCommand,
    CacheHoldCommand,
    KVCommand,
    MapCachedCommand,
    MapCommand,
    UnmapCommand,
)


class ChunkBooks:
    def __init__(self, num_slots: int) -> None:
        self.tables: list[list[int]] = [[] for _ in range(num_slots)]
        self.commands: list[KVCommand] = []
        self.committed = 0  # live chunks: mapped by a slot or held by the cache
        self.pinned = 0  # live chunks with a pin
        self.freed_total = 0  # chunks freed (mapped nowhere, not cached) over the books' life
        self._slots_of: dict[int, set[int]] = {}  # id -> slots mapping it
        self._index: dict[int, int] = {}  # id -> its chunk index (the same in every slot)
        self._cached: set[int] = set()
        self._pins: dict[int, int] = {}
        # Per slot: the lowest index of a cached entry (len(table) if none) and one past
        # the highest (0 if none); both may be loose after a truncation, never wrong
        # the other way: entries below first_cached, and from cached_end on, are private.
        self.first_cached = [0] * num_slots
        self.cached_end = [0] * num_slots
        # Per slot, exactly: its entries that are cached. ``len(table) - cached_in`` is
        # what the slot holds beyond the cache (what idle reclamation can give back).
        self.cached_in = [0] * num_slots
        self._next_id = 0

    # ----------------------------------------------------------- queries
    def is_cached(self, cid: int) -> bool:
        return cid in self._cached

    def is_private(self, cid: int) -> bool:
        """Mapped by one slot and not cached: the only chunks a step may write."""
        return cid not in self._cached and len(self._slots_of.get(cid, ())) == 1

    def is_pinned(self, cid: int) -> bool:
        return self._pins.get(cid, 0) > 0

    def index_of(self, cid: int) -> int:
        """The chunk index at which every holder maps ``cid``."""
        return self._index[cid]

    def holders(self, cid: int) -> frozenset[int]:
        return frozenset(self._slots_of.get(cid, ()))

    def uncached(self, slot: int) -> int:
        """Entries of the slot that the cache does not hold (exact)."""
        return len(self.tables[slot]) - self.cached_in[slot]

    def private_run(self, slot: int) -> int:
        """Leading entries of the slot known to be private (reusable in place)."""
        return min(self.first_cached[slot], len(self.tables[slot]))

    @property
    def cached_count(self) -> int:
        return len(self._cached)

    def cached_ids(self) -> set[int]:
        return set(self._cached)

    def count_uncached(self, running: Iterable[int]) -> tuple[int, int]:
        """``(live, idle)``: chunks not held by the cache that a ``running`` slot maps
        (live), or that only idle slots map (idle). Each chunk counted once; with the
        cached ones they add up to ``committed``. Walks every chunk: for stats only."""
        run = set(running)
        live = idle = 0
        for cid, slots in self._slots_of.items():
            if cid in self._cached:
                continue
            if slots.isdisjoint(run):
                idle += 1
            else:
                live += 1
        return live, idle

    # -------------------------------------------------------- primitives
    def map_fresh(self, slot: int, count: int) -> None:
        """Append ``count`` fresh chunks to the slot."""
        table = self.tables[slot]
        first = len(table)
        for i in range(first, first + count):
            cid = self._new_id(i)
            self._slots_of[cid] = {slot}
            table.append(cid)
        self.committed += count
        if self.first_cached[slot] >= first:
            self.first_cached[slot] = len(table)
        self.commands.append(MapCommand(slot, first, count))

    def map_cached(self, slot: int, first: int, ids: Sequence[int]) -> None:
        """Map cached chunks at ``[first, first+len(ids))``, replacing what is there."""
        table = self.tables[slot]
        if first > len(table):
            raise ValueError(f"slot {slot}: a hole at {len(table)} before {first}")
        old = table[first : first + len(ids)]
        if old:
            self.cached_in[slot] -= sum(1 for c in old if c in self._cached)
            self._drop_mappings(slot, old)
            self.commands.append(UnmapCommand(slot, first, len(old)))
        for i, cid in enumerate(ids):
            if cid not in self._cached or self._index[cid] != first + i:
                raise ValueError(f"chunk {cid} is not cached at index {first + i}")
            self._slots_of.setdefault(cid, set()).add(slot)
        table[first : first + len(ids)] = ids
        self.cached_in[slot] += len(ids)
        self.first_cached[slot] = min(self.first_cached[slot], first)
        self.cached_end[slot] = max(self.cached_end[slot], first + len(ids))
        self.commands.append(MapCachedCommand(slot, first, tuple(ids)))

    def truncate(self, slot: int, keep: int) -> int:
        """Unmap the slot's entries from index ``keep`` on; returns the chunks freed."""
        table = self.tables[slot]
        if keep >= len(table):
            return 0
        self.cached_in[slot] -= sum(1 for c in table[keep:] if c in self._cached)
        freed = self._drop_mappings(slot, table[keep:])
        self._emit_release(UnmapCommand(slot, keep, len(table) - keep))
        del table[keep:]
        self.first_cached[slot] = min(self.first_cached[slot], keep)
        self.cached_end[slot] = min(self.cached_end[slot], keep)
        return freed

    def cut_uncached(self, slot: int, keep: int) -> int:
        """Truncate the slot so that it keeps ``keep`` uncached entries: from the tail,
        through a cached entry only where an uncached one lies before it; returns the
        chunks freed. (An idle slot is cached blocks, then its private tail: only the
        tail goes.)"""
        table, need = self.tables[slot], self.uncached(slot) - keep
        end = len(table)
        while need > 0 and end > 0:
            end -= 1
            need -= table[end] not in self._cached
        return self.truncate(slot, end)

    def hold(self, slot: int, first: int, ids: Sequence[int]) -> None:
        """The cache adopts the slot's private chunks at ``[first, first+len(ids))``."""
        for cid in ids:
            if not self.is_private(cid) or slot not in self._slots_of[cid]:
                raise ValueError(f"the cache can adopt only a private chunk, not {cid}")
            self._cached.add(cid)
        self.cached_in[slot] += len(ids)
        self.first_cached[slot] = min(self.first_cached[slot], first)
        self.cached_end[slot] = max(self.cached_end[slot], first + len(ids))
        self.commands.append(CacheHoldCommand(slot, first, tuple(ids)))

    def drop(self, ids: Sequence[int]) -> int:
        """The cache lets go of ``ids``; returns the chunks freed (mapped nowhere)."""
        freed = 0
        for cid in ids:
            self._cached.remove(cid)
            for slot in self._slots_of.get(cid, ()):
                self.cached_in[slot] -= 1
            if cid not in self._slots_of:
                freed += self._forget(cid)
        if ids:
            self._emit_release(CacheDropCommand(tuple(ids)))
        return freed

    def refresh_bounds(self, slot: int) -> None:
        """Recompute the slot's first_cached / cached_end exactly (after chunks it maps
        were dropped by the cache and became private)."""
        cached = [i for i, c in enumerate(self.tables[slot]) if c in self._cached]
        self.first_cached[slot] = cached[0] if cached else len(self.tables[slot])
        self.cached_end[slot] = cached[-1] + 1 if cached else 0

    def pin(self, ids: Iterable[int], delta: int) -> None:
        """Add ``delta`` (+1 or -1) pins to each id."""
        for cid in ids:
            n = self._pins.get(cid, 0) + delta
            if n < 0:
                raise RuntimeError(f"chunk {cid} unpinned more than pinned")
            if n:
                self._pins[cid] = n
            else:
                del self._pins[cid]
            if (n > 0) != (n - delta > 0):
                self.pinned += 1 if n > 0 else -1

    # ----------------------------------------------------------- checks
    def violations(self, num_slots: int) -> list[str]:
        live = set(self._slots_of) | self._cached
        where: dict[int, set[int]] = {}
        for s, table in enumerate(self.tables):
            for i, cid in enumerate(table):
                where.setdefault(cid, set()).add(s)
                if self._index.get(cid) != i:
                    return [f"chunk books: chunk {cid} mapped at {i}, recorded at another index"]
        checks = [
            (where == self._slots_of, "slot tables and chunk holders disagree"),
            (len(live) == self.committed, f"{len(live)} live chunks, committed {self.committed}"),
            (set(self._pins) <= live, "a pinned chunk is not live"),
            (len(self._pins) == self.pinned, f"{len(self._pins)} pinned, counted {self.pinned}"),
            (all(len(s) == 1 or c in self._cached for c, s in where.items()),
             "a chunk mapped by two slots is not cached"),
            (set(self._index) == live, "chunk indices out of step with live chunks"),
            (all(self._private_below(s) for s in range(num_slots)),
             "a slot's first_cached / cached_end bounds are wrong"),
            (all(self.cached_in[s] == sum(c in self._cached for c in t)
                 for s, t in enumerate(self.tables)), "a slot's cached_in count is wrong"),
        ]  # fmt: skip
        return [f"chunk books: {what}" for ok, what in checks if not ok]

    def pin_counts(self) -> dict[int, int]:
        return dict(self._pins)

    # ---------------------------------------------------------- private
    def _emit_release(self, new: UnmapCommand | CacheDropCommand) -> None:
        """Append a command that only drops references, merged into an earlier one where
        possible: an unmap of the same slot's range just after it, or a cache drop.
        Reference drops commute with each other (the last one frees the chunk, in
        whichever order they run), so the trailing run of them may be merged across;
        a map in between ends the run. Evicting a chain of blocks from an idle slot
        then costs one unmap and one drop, not one of each per chunk."""
        for i in range(len(self.commands) - 1, max(-1, len(self.commands) - 33), -1):
            old = self.commands[i]
            if not isinstance(old, UnmapCommand | CacheDropCommand):
                break
            if isinstance(new, CacheDropCommand) and isinstance(old, CacheDropCommand):
                self.commands[i] = CacheDropCommand(old.chunks + new.chunks)
                return
            if (
                isinstance(new, UnmapCommand)
                and isinstance(old, UnmapCommand)
                and old.slot == new.slot
                and old.first == new.first + new.count
            ):
                self.commands[i] = UnmapCommand(new.slot, new.first, new.count + old.count)
                return
        self.commands.append(new)

    def _new_id(self, index: int) -> int:
        cid = self._next_id
        self._next_id += 1
        self._index[cid] = index
        return cid

    def _drop_mappings(self, slot: int, ids: Sequence[int]) -> int:
        freed = 0
        for cid in ids:
            holders = self._slots_of[cid]
            holders.remove(slot)
            if not holders:
                del self._slots_of[cid]
                if cid not in self._cached:
                    freed += self._forget(cid)
        return freed

    def _forget(self, cid: int) -> int:
        if self._pins.get(cid):
            raise RuntimeError(f"chunk {cid} freed while pinned")
        del self._index[cid]
        self.committed -= 1
        self.freed_total += 1
        return 1

    def _private_below(self, slot: int) -> bool:
        table = self.tables[slot]
        head = table[: self.first_cached[slot]]
        tail = table[self.cached_end[slot] :]
        return all(self.is_private(c) for c in (*head, *tail))
