"""IdleReclaimer: applies the idle policy (``idle_policy.py``) to the KV manager's books.

Torch-free; part of the KV manager, whose books it changes. It records when each
slot went idle, cuts idle slots as the policy plans (unmap commands), and then
emits a :class:`ReleaseFreeCommand` so that the pool gives its free chunks back
to the driver: the mapper thread runs both, in order, off the step's path.

With a watermark of at least the budget and no idle time, reclamation is off: no
release is ever asked for (``off``). Otherwise, how much the pool keeps free:
while requests run, up to what the watermark leaves after the idle slots'
mappings (``watermark - idle``), so that a burst does not pay ``cuMemCreate``
for every chunk it unmapped a moment ago; with no request running, nothing.
Either way, after the release (and until the next map), idle mappings + free
chunks <= the watermark.

The policy runs at every release (the watermark binds at once) and at every
``tick`` past the earliest deadline (the idle time binds within a tick). At the
same points the prefix cache is brought back within its budget, if it has one
(``cache_budget_chunks``): cached chunks are not idle, but they are held too.
An idle slot's cached blocks are not counted as idle and stay mapped (cutting
them would free nothing): only its uncached tail is cut (``cut_uncached``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .commands import ReleaseFreeCommand
from .idle_policy import Clock, IdleReclaimPolicy, IdleSlot

if TYPE_CHECKING:
    from .manager import KVCacheManager


class IdleReclaimer:
    def __init__(self, kv: KVCacheManager, policy: IdleReclaimPolicy, clock: Clock) -> None:
        self.kv = kv
        self.policy = policy
        self.clock = clock
        self._since: dict[int, float] = {}  # idle slot -> when it went idle (or was premapped)
        self._deadline: float | None = None
        self._freed_seen = 0  # books.freed_total when the pool was last told to release
        self._kept_free = 0  # the keep_free of that release
        self.reclaimed_chunks = 0  # freed by this policy over the manager's life

    def set_clock(self, clock: Clock) -> None:
        """Use ``clock`` from now on; every idle slot counts as idle from now."""
        self.clock = clock
        now = clock()
        self._since = {s: now for s in self.kv.slots.idle_slots()}
        self._deadline = self.policy.deadline(self._slots())

    def on_idle(self, slot: int) -> None:
        """``slot`` went idle: it counts from now, and the policy runs (the watermark)."""
        self.apply(self.touch(slot))

    def touch(self, slot: int) -> float:
        """An idle slot was mapped ahead (premap, which keeps within the watermark by
        itself): its idle time starts now. Returns now."""
        now = self.clock()
        self._since[slot] = now
        if self.policy.timeout_s is not None:
            due = now + self.policy.timeout_s
            self._deadline = due if self._deadline is None else min(self._deadline, due)
        return now

    def tick(self) -> int:
        """Apply the policy if a slot's idle time may have run out, or if chunks were
        freed since the pool last released and no request runs; returns the chunks freed."""
        now = self.clock()
        due = self._deadline is not None and now >= self._deadline
        if not due and (
            self.kv.slots.has_running() or self.kv.books.freed_total == self._freed_seen
        ):
            return 0  # the fast path of every step
        return self.apply(now)

    @property
    def off(self) -> bool:
        """No watermark below the budget and no idle time: nothing is ever released (the
        pool keeps every chunk it created, as a preallocating engine does)."""
        p = self.policy
        return p.timeout_s is None and p.watermark_chunks >= self.kv.geometry.capacity_chunks

    def deadline(self) -> float | None:
        """When the next idle slot's time runs out, on this reclaimer's clock."""
        return self._deadline

    def apply(self, now: float) -> int:
        """Bring the cache within its budget, cut what the policy plans; then, if anything
        was freed since the last release, tell the pool to release its free chunks."""
        books = self.kv.books
        freed = 0
        budget = self.kv.cache_budget_chunks
        while budget is not None and books.cached_count > budget:
            # Unlocked blocks, LRU first. ``evict`` counts chunks freed, which may
            # exceed the cached ones (an idle slot is cut after them too): loop.
            got = self.kv.evict(books.cached_count - budget)
            if not got:
                break  # the rest is locked by running requests
            freed += got
        for slot, keep in self.policy.plan(self._slots(), now).items():
            freed += books.cut_uncached(slot, keep)
        self.reclaimed_chunks += freed
        self._deadline = self.policy.deadline(self._slots())
        if self.off:
            self._freed_seen = books.freed_total  # nothing to release: keep the fast path
            return freed
        keep_free = 0
        if self.kv.slots.has_running():
            keep_free = max(0, self.policy.watermark_chunks - self.kv.slots.idle_chunks)
        # Release if chunks were freed since, or if the last release kept more free than
        # now allowed (the load ended: what it kept for the burst goes too).
        if books.freed_total != self._freed_seen or keep_free < self._kept_free:
            books.commands.append(ReleaseFreeCommand(keep_free))
            self._freed_seen, self._kept_free = books.freed_total, keep_free
        return freed

    def _slots(self) -> list[IdleSlot]:
        books = self.kv.books
        return [
            IdleSlot(s, books.uncached(s), self._since.get(s, 0.0))
            for s in self.kv.slots.idle_slots()
            if books.uncached(s)
        ]
