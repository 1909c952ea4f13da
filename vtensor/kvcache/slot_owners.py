"""SlotOwners: which request owns each slot, and what each owner has asked for.

Torch-free; the KV manager owns one (``KVCacheManager.slots``) and decides with
it. A slot is either owned by exactly one request or idle; slots
``[0, reserved_slots)`` are the caller's and neither. An owner's *asked* mark
counts the chunks at the front of its slot that its request needs: they are
pinned in the books (no reclaim takes them), and what the slot maps beyond it is
*surplus*. An idle slot asks for nothing and may keep chunks mapped (deferred
reclamation); each records when it last went idle (a logical time).

Invariants (``manager_checks.py``): idle and owned slots partition the unreserved
slots; an idle slot's mark is 0; an owner's mark is at most what its slot maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from .chunk_books import ChunkBooks


class SlotOwners:
    """The slots' owners (request id -> slot), the idle slots, and the owners' asked marks."""

    def __init__(self, books: ChunkBooks, num_slots: int, reserved_slots: int) -> None:
        self.books = books  # the asked marks pin their chunks here
        self._owner: dict[int, int] = {}  # request id -> slot
        self._idle: set[int] = set(range(reserved_slots, num_slots))
        self._asked = [0] * num_slots  # chunks the owner has asked for so far
        self._released = [0] * num_slots  # when each slot last went idle
        self._releases = 0

    # ------------------------------------------------------------------ query
    def slot_of(self, rid: int) -> int:
        return self._owner[rid]

    def owns(self, rid: int) -> bool:
        """Whether request ``rid`` holds a slot."""
        return rid in self._owner

    def owners(self) -> dict[int, int]:
        """Request id -> slot, for every slot in use (a copy)."""
        return dict(self._owner)

    def owner_map(self) -> Mapping[int, int]:
        """Request id -> slot, live and read-only (the step path: no copy)."""
        return MappingProxyType(self._owner)

    def idle_slots(self) -> frozenset[int]:
        return frozenset(self._idle)

    def has_running(self) -> bool:
        return bool(self._owner)

    def has_free_slot(self) -> bool:
        return bool(self._idle)

    def asked(self, slot: int) -> int:
        return self._asked[slot]

    def released_at(self, slot: int) -> int:
        """A logical time: when the slot last went idle (0: never)."""
        return self._released[slot]

    @property
    def idle_chunks(self) -> int:
        """What idle slots map beyond the cache: the memory deferred reclamation keeps.
        Cached chunks an idle slot maps are not counted (the cache holds them either
        way; unmapping them from the slot would free nothing and make the next turn of
        its conversation map them again)."""
        return sum(self.books.uncached(s) for s in self._idle)

    @property
    def surplus_chunks(self) -> int:
        """What owned slots map beyond their asked marks."""
        return sum(len(self.books.tables[s]) - self._asked[s] for s in self._owner.values())

    # ---------------------------------------------------------------- updates
    def take(self, rid: int, slot: int) -> None:
        """Request ``rid`` takes the idle ``slot`` (asking for nothing yet)."""
        self._idle.discard(slot)
        self._owner[rid] = slot

    def release(self, rid: int) -> int:
        """Request ``rid`` gives its slot up: its mark goes to 0 (unpinning), the slot
        idles from now, keeping its chunks. Returns the slot."""
        slot = self._owner.pop(rid)
        self.set_asked(slot, 0)
        self._idle.add(slot)
        self._released[slot] = self._releases = self._releases + 1
        return slot

    def set_asked(self, slot: int, n: int) -> None:
        """Move the owner's asked mark (``<= len(table)``), pinning what it covers."""
        a, table = self._asked[slot], self.books.tables[slot]
        if n > a:
            self.books.pin(table[a:n], +1)
        elif n < a:
            self.books.pin(table[n:a], -1)
        self._asked[slot] = n

    def ask(
        self, slot: int, want: int, make_room: Callable[[int, bool], bool], steal: bool
    ) -> bool:
        """The owner of ``slot`` asks for its first ``want`` chunks; those it lacks are
        mapped fresh once ``make_room(need, steal)`` has freed them. On False nothing
        changed: ``make_room`` could not (its own chunks are never its victims)."""
        have, asked = len(self.books.tables[slot]), self._asked[slot]
        if want <= have:
            if want > asked:
                self.set_asked(slot, want)
            return True
        self.set_asked(slot, have)  # its own chunks are not surplus to reclaim
        need = want - have
        if not make_room(need, steal):
            self.set_asked(slot, asked)
            return False
        self.books.map_fresh(slot, need)
        self.set_asked(slot, want)
        return True
