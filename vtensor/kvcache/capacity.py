"""KVCapacity: how many chunks the KV manager may commit now, and what admission takes.

Torch-free; the KV manager owns one (``KVCacheManager.capacity``). The pool's
capacity (``KVGeometry.capacity_chunks``) may be capped twice: by a shared
budget's lease (``shared_budget.py``: only its grant may be committed, topped up
before a map) and by the unified pool's KV share (``limit``:
``elastic_planner.py``). Against that cap the books' counts give what is free
(not committed), reclaimable (committed, not pinned) and available (free or
reclaimable), and what a new request would pin: its chunks, less the cached ones
someone pins already.

Invariant (``manager_checks.py``): committed <= the cap (``set_lease`` and
``set_limit`` refuse to set a cap below it).
"""

from __future__ import annotations

from .chunk_books import ChunkBooks
from .prefix_cache import PrefixMatch
from .shared_budget import KVLease


class KVCapacity:
    """The cap on the chunks the books may commit, and the counts measured against it."""

    def __init__(self, books: ChunkBooks, pool_chunks: int) -> None:
        self.books = books
        self.pool_chunks = pool_chunks  # the pool's capacity (``KVGeometry.capacity_chunks``)
        self.lease: KVLease | None = None  # a shared budget's account (``set_lease``)
        self.limit: int | None = None  # the unified pool's KV share (``set_limit``)

    def set_lease(self, lease: KVLease) -> None:
        """Draw on a shared budget (``shared_budget.py``) from now on: the manager may
        commit only its lease's grant, topped up before it maps. Nothing may be
        committed yet."""
        if self.books.committed:
            raise RuntimeError("a lease can only be set before any chunk is committed")
        self.lease = lease

    def set_limit(self, chunks: int | None) -> None:
        """Commit at most ``chunks`` from now on (None: the pool's capacity): the KV's
        share of a unified pool (``elastic_planner.py``). Refused (ValueError) below
        what is committed: the caller reclaims or preempts first."""
        if chunks is not None and not self.books.committed <= chunks:
            raise ValueError(f"limit {chunks} is below the {self.books.committed} committed")
        self.limit = chunks

    @property
    def chunks(self) -> int:
        """The chunks the books may commit now: the pool's, or the lease's grant, or
        the unified pool's KV share (``limit``), whichever is least."""
        cap = self.pool_chunks
        if self.lease is not None:
            cap = min(cap, self.lease.grant)
        return cap if self.limit is None else min(cap, self.limit)

    @property
    def free(self) -> int:
        return self.chunks - self.books.committed

    @property
    def available(self) -> int:
        """Chunks the pool can still give: free, or reclaimable (not pinned)."""
        return self.chunks - self.books.pinned

    @property
    def reclaimable(self) -> int:
        return self.books.committed - self.books.pinned

    def new_pins(self, want: int, hit: PrefixMatch) -> int:
        """The chunks a request of ``want`` chunks (its hit's first) would pin anew:
        cached chunks that someone already pins cost nothing more."""
        pinned = sum(1 for c in hit.chunks if self.books.is_pinned(c))
        return want - pinned

    def shortfall(self, want: int, headroom_chunks: int, hit: PrefixMatch) -> int:
        """The chunks that admitting a request of ``want`` chunks (``hit`` cached),
        leaving ``headroom_chunks`` to spare, lacks now (<= 0: none)."""
        return self.new_pins(want, hit) + headroom_chunks - self.available

    def fits(self, want: int, headroom_chunks: int, hit: PrefixMatch) -> bool:
        """Whether that request fits now; on a shared budget the lease first pulls
        what it lacks from the other engines (reclaiming there)."""
        short = self.shortfall(want, headroom_chunks, hit)
        if short > 0 and self.lease is not None:  # a shared budget: others may give some
            self.lease.pull(short, reclaim=True)
        return self.new_pins(want, hit) <= self.available - headroom_chunks
