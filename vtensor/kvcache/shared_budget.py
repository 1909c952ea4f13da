"""SharedKVBudget: one KV chunk budget that several engines' KV managers draw from.

Torch-free. The budget counts ``total`` chunks. Each member (one engine) holds a
*lease*: ``fixed`` chunks it keeps for good (its scratch slot) and a *grant*, the
chunks its KV manager may commit. What no lease holds is *unallocated*.

Invariants (``violations``):

* ``sum(fixed + grant) + unallocated == total`` and ``unallocated >= 0``: the
  committed chunks of all engines together never exceed the one budget;
* a member's books never commit more than its grant (``KVCacheManager`` tops its
  grant up *before* it maps, and a grant only shrinks to what its books commit);
* a grant shrinks (``settle``) only once its member's mapper has applied every
  unmap that freed the chunks, so the physical chunks (each engine keeps its own
  ``ChunkPool``, whose capacity follows its lease) never exceed the budget either.

Threads. Each member's books are touched only by its own engine thread, or by
another thread that holds the member's engine lock (``BudgetMember``). The budget
lock guards the counters alone and is always taken last and held briefly: no
code calls out of the budget while holding it. Taking memory from another member
(``KVLease.pull``) calls ``BudgetMember.give_back``, which must never block on a
lock: a member busy in a step refuses at once and remembers the ask, serving it
between its steps (``KVLease.take_asks``). So no two engines ever wait on each
other, and no deadlock is possible.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass


class BudgetMember(ABC):
    """An engine that draws on a :class:`SharedKVBudget`.

    Contract of ``give_back``: called from *another* engine's thread. Without
    blocking, try to take this engine's lock; if it is busy, record the ask
    (``KVLease.ask``) and return 0. Otherwise: when ``reclaim``, free up to
    ``chunks`` of the reclaimable chunks (idle slots, surplus, unlocked prefix-cache
    blocks, least recently used first) beyond the grant it does not use; apply the
    resulting unmaps, wait for them, then ``settle`` (the unused grant goes back).
    Returns the chunks given back to the budget."""

    @abstractmethod
    def give_back(self, chunks: int, reclaim: bool) -> int: ...


@dataclass(frozen=True)
class LeaseStats:
    name: str
    fixed_chunks: int
    granted_chunks: int
    asked_chunks: int


@dataclass(frozen=True)
class BudgetStats:
    total_chunks: int
    unallocated_chunks: int
    leases: tuple[LeaseStats, ...]


class KVLease:
    """One member's account. ``grant`` changes only under the budget's lock; it grows
    on the member's own thread (``top_up``) and shrinks only in ``settle``."""

    def __init__(self, budget: SharedKVBudget, name: str, fixed: int, member: BudgetMember) -> None:
        self.budget = budget
        self.name = name
        self.fixed = fixed
        self.member = member
        self.grant = 0
        self.asked = 0  # chunks other members asked for while this one was busy
        self.ask_reclaim = False
        self.on_change: Callable[[int], object] | None = None  # (fixed + grant) after a change

    def top_up(self, chunks: int) -> int:
        """Move up to ``chunks`` unallocated chunks into the grant; returns how many."""
        if chunks <= 0:
            return 0
        with self.budget.lock:
            take = min(chunks, self.budget.unallocated)
            self.grant += take
            self.budget.unallocated -= take
            self._changed(take)
        return take

    def pull(self, chunks: int, reclaim: bool) -> int:
        """Top up by ``chunks``: unallocated first, then what other members give back
        (their unused grant; with ``reclaim`` also their reclaimable chunks). Never
        blocks on another member. Returns the chunks added to the grant."""
        got = self.top_up(chunks)
        for other in self.budget.others(self):
            if got >= chunks:
                break
            if other.member.give_back(chunks - got, reclaim):
                got += self.top_up(chunks - got)
        return got

    def settle(self, committed: int) -> int:
        """Give back the grant beyond ``committed`` (the member's books, with every unmap
        applied: see the module's invariants). Returns the chunks given back."""
        with self.budget.lock:
            back = max(0, self.grant - committed)
            self.grant -= back
            self.budget.unallocated += back
            self._changed(back)
        return back

    def ask(self, chunks: int, reclaim: bool) -> None:
        """Another member wants ``chunks``; served by ``take_asks`` between steps."""
        with self.budget.lock:
            self.asked = max(self.asked, chunks)
            self.ask_reclaim = self.ask_reclaim or reclaim

    def take_asks(self) -> tuple[int, bool]:
        """The pending ask (chunks, reclaim), cleared; (0, False) if none."""
        with self.budget.lock:
            out = (self.asked, self.ask_reclaim)
            self.asked, self.ask_reclaim = 0, False
        return out

    @property
    def held(self) -> int:
        return self.fixed + self.grant

    def _changed(self, delta: int) -> None:
        if delta and self.on_change is not None:
            self.on_change(self.fixed + self.grant)


class SharedKVBudget:
    """``total_chunks`` chunks of ``chunk_size`` bytes shared by every lease."""

    def __init__(self, total_chunks: int, chunk_size: int) -> None:
        if total_chunks <= 0 or chunk_size <= 0:
            raise ValueError(f"a budget needs chunks, got {total_chunks} of {chunk_size} bytes")
        self.total = total_chunks
        self.chunk_size = chunk_size
        self.unallocated = total_chunks
        self.lock = threading.RLock()
        self._leases: list[KVLease] = []

    def join(self, name: str, fixed: int, member: BudgetMember, chunk_size: int) -> KVLease:
        """A new member keeping ``fixed`` chunks for good. Refused (ValueError) if its
        chunk size differs or the budget cannot hold ``fixed`` more chunks."""
        if chunk_size != self.chunk_size:
            raise ValueError(
                f"{name!r} uses {chunk_size}-byte chunks, the shared KV pool {self.chunk_size}-"
                f"byte ones: every engine on one pool must have the same chunk size"
            )
        with self.lock:
            if any(lease.name == name for lease in self._leases):
                raise ValueError(f"a member named {name!r} already draws on this budget")
            if fixed > self.unallocated:
                raise ValueError(
                    f"{name!r} needs {fixed} chunks for good, the budget has "
                    f"{self.unallocated} of {self.total} unallocated"
                )
            lease = KVLease(self, name, fixed, member)
            self.unallocated -= fixed
            self._leases.append(lease)
        return lease

    def leave(self, lease: KVLease) -> None:
        """The member is gone: everything it held goes back (its pool is closed)."""
        with self.lock:
            self._leases.remove(lease)
            self.unallocated += lease.fixed + lease.grant
            lease.grant = 0

    def leases(self) -> list[KVLease]:
        with self.lock:
            return list(self._leases)

    def others(self, lease: KVLease) -> list[KVLease]:
        with self.lock:
            return [x for x in self._leases if x is not lease]

    def stats(self) -> BudgetStats:
        with self.lock:
            leases = tuple(LeaseStats(x.name, x.fixed, x.grant, x.asked) for x in self._leases)
            return BudgetStats(self.total, self.unallocated, leases)

    def violations(self) -> list[str]:
        with self.lock:
            held = sum(x.fixed + x.grant for x in self._leases)
            problems = []
            if held + self.unallocated != self.total:
                problems.append(f"leases {held} + unallocated {self.unallocated} != {self.total}")
            if self.unallocated < 0 or any(x.grant < 0 for x in self._leases):
                problems.append("a negative count")
            return [f"shared KV budget: {p}" for p in problems]
