"""KV cache bookkeeping: request slots, the chunk each slot position maps, the prefix cache.

Torch-free on purpose: it decides, in plain integers, which chunks to map, share
or unmap, and emits them as commands (``kvcache/commands.py``); ``KVArena``
carries them out on the virtual tensor through the asynchronous mapper. The
scheduler asks it whether a request fits and tells it when requests grow,
compute whole blocks, or finish. It owns its parts and delegates to them: the
books (``chunk_books.py``), the slots' owners (``slot_owners.py``), the cap on
what it commits (``capacity.py``), the running requests' cache links
(``cache_links.py``), slot placement (``placement.py``) and reclaim
(``reclaim.py``, ``idle_reclaim.py``).

Each slot owns a fixed, chunk-aligned byte range of the arena, and its mapped
chunks always form a prefix of that range (KV grows from token 0). A chunk is
either private to one slot, or held by the prefix cache (and then mapped by any
number of slots, all at the same index): a request that hits the cache maps the
cached chunks at the front of its slot and computes only the rest.

Invariants (listed by ``violations``, asserted by ``check``):

* ``committed`` (chunks in use) ``<= capacity_chunks``; unmaps are emitted before
  the maps that reuse their chunks, and the mapper applies commands in order;
* **a step writes only private chunks** (``check_writes`` raises
  :class:`SharedChunkWriteError` otherwise): cached chunks are read-only;
* a slot is either owned by exactly one request or idle; an idle slot may keep
  chunks mapped (deferred reclamation), bounded by ``keep_idle_chunks`` (the
  watermark) and ``idle_timeout_s`` (``idle_reclaim.py``);
* a running request's chunks up to what it has asked for, and the chunks of
  every cache block it has locked, are *pinned*; everything else in use is
  reclaimable (``reclaim.py``), all before the scheduler preempts anyone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from .cache_links import CacheLinks
from .capacity import KVCapacity
from .chunk_books import ChunkBooks
from .commands import (
    CacheDropCommand,
    CacheHoldCommand,
    KVCommand,
    MapCachedCommand,
    MapCommand,
    ReleaseFreeCommand,
    UnmapCommand,
)
from .geometry import KVGeometry
from .host_tier import HostExtent
from .idle_policy import Clock, IdleReclaimPolicy
from .idle_reclaim import IdleReclaimer
from .placement import SlotPlacer
from .prefix_cache import NO_MATCH, NoPrefixCache, PrefixCache, PrefixMatch, SpillOut, check_blocks
from .reclaim import Reclaimer
from .slot_owners import SlotOwners
from .usage import KVUsage, kv_usage
from .write_guard import SharedChunkWriteError, check_writes

__all__ = [
    "CacheDropCommand",
    "CacheHoldCommand",
    "KVCacheManager",
    "KVCommand",
    "KVGeometry",
    "KVUsage",
    "MapCachedCommand",
    "MapCommand",
    "ReleaseFreeCommand",
    "SharedChunkWriteError",
    "UnmapCommand",
]


class KVCacheManager:
    def __init__(
        self,
        geometry: KVGeometry,
        keep_idle_chunks: int | None = None,
        reserved_slots: int = 0,
        prefix_cache: PrefixCache | None = None,
        idle_timeout_s: float | None = None,
        clock: Clock = time.monotonic,
        cache_budget_chunks: int | None = None,
    ) -> None:
        """Slots ``[0, reserved_slots)`` belong to the caller and are never handed out;
        their chunks are not counted in ``geometry.capacity_chunks``. Without a
        ``prefix_cache`` nothing is cached (``NoPrefixCache``). Idle slots keep at most
        ``keep_idle_chunks`` mappings (None: no limit) for at most ``idle_timeout_s``
        seconds of ``clock`` (None: no limit). The prefix cache keeps at most
        ``cache_budget_chunks`` once its blocks are unlocked (None: the pool bounds it),
        evicting least recently used blocks at each release."""
        if not 0 <= reserved_slots < geometry.num_slots:
            raise ValueError(f"reserved_slots must be in [0, {geometry.num_slots})")
        self.geometry = geometry
        self.reserved_slots = reserved_slots
        self.keep_idle_chunks = (
            geometry.capacity_chunks if keep_idle_chunks is None else keep_idle_chunks
        )
        self.cache: PrefixCache = prefix_cache or NoPrefixCache()
        check_blocks(self.cache, geometry.cache_block())
        self.books = ChunkBooks(geometry.num_slots)
        self.slots = SlotOwners(self.books, geometry.num_slots, reserved_slots)
        self.capacity = KVCapacity(self.books, geometry.capacity_chunks)
        self.links = CacheLinks(self)  # running requests' locked cache prefixes
        self._applied_committed = 0  # committed as of the last take_commands
        self._reclaimer = Reclaimer(self)
        self._placer = SlotPlacer(self)
        if cache_budget_chunks is not None and cache_budget_chunks < 0:
            raise ValueError(f"cache_budget_chunks must be >= 0, got {cache_budget_chunks}")
        self.cache_budget_chunks = cache_budget_chunks
        policy = IdleReclaimPolicy(self.keep_idle_chunks, idle_timeout_s)
        self.idle = IdleReclaimer(self, policy, clock)

    # ------------------------------------------------------------------ query
    @property
    def capacity_chunks(self) -> int:
        """The chunks the books may commit now (``KVCapacity.chunks``)."""
        return self.capacity.chunks

    @property
    def free_chunks(self) -> int:
        return self.capacity.free

    @property
    def evicted_chunks(self) -> int:
        """Chunks freed by evicting cache blocks, over the manager's life."""
        return self._reclaimer.evicted_chunks

    @property
    def committed_applied(self) -> int:
        """Chunks in use once the commands taken so far are applied (integrity checks)."""
        return self._applied_committed

    def mapped_chunks(self, rid: int) -> int:
        return len(self.books.tables[self.slots.slot_of(rid)])

    def slot_table(self, slot: int) -> tuple[int, ...]:
        return tuple(self.books.tables[slot])

    def usage(self) -> KVUsage:
        return kv_usage(self)

    def match(self, token_ids: Sequence[int], max_tokens: int) -> PrefixMatch:
        """The longest cached prefix of ``token_ids``, at most ``max_tokens`` tokens (a
        request must compute at least its last token: ``max_tokens = len - 1``). Use it
        at once: it is valid until the cache changes."""
        return self.cache.match(token_ids, max_tokens) if self.cache.enabled else NO_MATCH

    def can_admit(self, tokens: int, headroom_chunks: int = 0, hit: PrefixMatch = NO_MATCH) -> bool:
        """Whether a new request of ``tokens`` (its first ``hit.tokens`` cached) fits now,
        leaving ``headroom_chunks`` to spare (``KVCapacity.fits``)."""
        if not self.slots.has_free_slot():
            return False
        return self.capacity.fits(self.geometry.chunks_for(tokens), headroom_chunks, hit)

    def admit_shortfall(
        self, tokens: int, headroom_chunks: int = 0, hit: PrefixMatch = NO_MATCH
    ) -> int:
        """The chunks ``can_admit(tokens, headroom_chunks, hit)`` lacks now (<= 0: none;
        a free slot is not counted: see ``SlotOwners.has_free_slot``)."""
        return self.capacity.shortfall(self.geometry.chunks_for(tokens), headroom_chunks, hit)

    # ---------------------------------------------------------------- updates
    def admit(self, rid: int, tokens: int, hit: PrefixMatch = NO_MATCH) -> int | None:
        """Give request ``rid`` a slot mapped for ``tokens``, the first ``hit.tokens`` of
        them shared from the cache; None (and nothing changed) if it does not fit.
        The slot is the idle one that already maps most of the hit (slot affinity),
        else the best fit."""
        if self.slots.owns(rid):
            raise ValueError(f"request {rid} already holds slot {self.slots.slot_of(rid)}")
        want = self.geometry.chunks_for(tokens)
        if want <= len(hit.chunks) + hit.restore * self.cache.block_chunks:
            raise ValueError(
                f"{tokens} tokens leave nothing to compute after a {hit.tokens}-token hit"
            )
        if not self.can_admit(tokens, 0, hit):
            return None
        slot = self._placer.place(rid, want, hit)
        if not self.grow(rid, tokens):
            raise RuntimeError("admission fit the books but could not grow: a bug")
        if hit.restore:
            self.links.restore(slot, hit)
        return slot

    def evict_to_free(self, chunks: int, keep: Sequence[PrefixMatch] = ()) -> int:
        """Evict unlocked cache blocks until ``chunks`` are free (``CacheLinks``)."""
        return self.links.evict_to_free(chunks, keep)

    def take_restores(self) -> list[tuple[int, HostExtent]]:
        """The host blocks' copy-ins to make before the step (``CacheLinks``)."""
        return self.links.take_restores()

    def take_spills(self) -> list[SpillOut]:
        """The spilled blocks' copies to make before their chunks are dropped."""
        return self.cache.take_spills()

    def grow(self, rid: int, tokens: int, steal: bool = True) -> bool:
        """Ensure ``rid``'s slot maps its first ``tokens`` tokens: free chunks first, then
        (if ``steal``) reclaimed ones (``Reclaimer.make_room``). On False nothing changed:
        the caller preempts someone and retries."""
        want = self.geometry.chunks_for(tokens)
        return self.slots.ask(self.slots.slot_of(rid), want, self._reclaimer.make_room, steal)

    def premap(
        self,
        token_counts: Sequence[int],
        headroom_chunks: int = 0,
        hits: Sequence[PrefixMatch] | None = None,
    ) -> None:
        """Map idle slots ahead for the requests expected next (``SlotPlacer.premap``)."""
        self._placer.premap(token_counts, headroom_chunks, hits)

    def cache_tokens(self, rid: int, token_ids: Sequence[int], num_tokens: int) -> None:
        """Offer the cache ``rid``'s computed whole blocks (``CacheLinks.offer``)."""
        self.links.offer(rid, token_ids, num_tokens)

    def release(self, rid: int) -> None:
        """The request is done (or preempted): its slot idles, keeping its chunks; its
        cache blocks are unlocked. Offer its last blocks first (``cache_tokens``)."""
        slot = self.slots.release(rid)
        self.links.unlink(rid)
        self.idle.on_idle(slot)  # the watermark binds at once: the oldest idle slots lose

    def shrink(self, rid: int, chunks: int) -> None:
        """Unmap ``rid``'s chunks from index ``chunks`` on; it keeps its slot (not idle)
        and asks for ``chunks`` (a swap-out: ``swap_chunks.py``)."""
        slot = self.slots.slot_of(rid)
        self.slots.set_asked(slot, chunks)
        self.books.truncate(slot, chunks)

    def reclaim_idle(self) -> int:
        """Bounded deferred reclamation (``IdleReclaimer.tick``); returns chunks freed."""
        return self.idle.tick()

    def reclaim(self, chunks: int) -> int:
        """Free up to ``chunks`` reclaimable chunks (``Reclaimer`` order); returns how
        many. A shared budget's member does this for another engine (``give_back``)."""
        return self._reclaimer.reclaim_up_to(chunks)

    def reclaim_all(self) -> None:
        """Unmap every idle slot's chunks (shutdown, or a caller that needs the pool).
        Cached chunks stay in the cache."""
        for slot in self.slots.idle_slots():
            self.books.truncate(slot, 0)

    def evict(self, chunks: int) -> int:
        """Free up to ``chunks`` chunks from the cache, least recently used blocks first;
        returns how many were freed."""
        return self._reclaimer.evict(chunks)

    def convert_in_place(self, slot: int, start: int) -> int:
        """See ``Reclaimer.convert_in_place`` (slot placement uses it)."""
        return self._reclaimer.convert_in_place(slot, start)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached block and every idle slot's mappings, so that all chunks go
        back to the pool. Refused (False, nothing changed) while requests run."""
        if self.slots.has_running():
            return False
        self.reclaim_all()
        self.books.drop(self.cache.reset())
        return True

    def set_prefix_cache(self, cache: PrefixCache) -> None:
        """Replace the prefix cache (between runs: nothing may be running); the old one
        is reset first, so every chunk it held goes back."""
        if not self.reset_prefix_cache():
            raise RuntimeError("the prefix cache can only be replaced while no request runs")
        check_blocks(cache, self.geometry.cache_block())
        self.cache = cache

    def check_writes(self, writes: Iterable[tuple[int, int, int]]) -> None:
        """Raise :class:`SharedChunkWriteError` unless each ``(rid, start, end)`` (a
        step's span) writes only chunks its request's slot maps alone (``write_guard``)."""
        check_writes(self.books, self.slots.owner_map(), self.geometry, writes)

    def take_commands(self) -> list[KVCommand]:
        """Take the commands emitted since the last take, in the order they must run."""
        commands, self.books.commands = self.books.commands, []
        self._applied_committed = self.books.committed
        return commands

    def pending_commands(self) -> tuple[KVCommand, ...]:
        """The commands emitted but not taken yet (read-only: integrity checks)."""
        return tuple(self.books.commands)

    def violations(self) -> list[str]:
        """The broken invariants, described; empty when the books are consistent."""
        from .manager_checks import manager_violations

        return manager_violations(self)

    def check(self) -> None:
        problems = self.violations()
        if problems:
            raise AssertionError("; ".join(problems))
