"""Bounded deferred reclamation: how long, and how much, idle slots may keep mapped.

Torch-free. A finished request's slot keeps its chunks mapped (*idle* chunks), so
that the next request (often the next turn of the same conversation) finds them
mapped and its step does not wait on the mapper. Kept without bound, idle chunks
are memory the engine holds for no one: after a burst, all of it. The policy
bounds them two ways:

* **watermark**: idle slots keep at most ``watermark_chunks`` mappings in all;
  past it, the slots idle longest lose their chunks first, from the tail (the
  slots released last are the likeliest to be reused);
* **idle time**: a slot idle for ``timeout_s`` or longer loses all its chunks.

The KV manager applies the plan (``KVCacheManager.reclaim_idle``): it unmaps the
cut chunks and then asks the pool to release its free chunks to the driver,
both on the mapper thread. Chunks held by the prefix cache are not idle: the
cache has its own LRU; cutting a slot's mapping of a cached chunk frees nothing.

Times come from a clock passed in (``Clock``): ``time.monotonic`` in the engine,
a :class:`ManualClock` in tests, so that a test controls when time passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Clock = Callable[[], float]

DEFAULT_WATERMARK_MIN_CHUNKS = 64
DEFAULT_WATERMARK_FRACTION = 0.05
DEFAULT_IDLE_TIMEOUT_S = 2.0


def default_watermark(capacity_chunks: int) -> int:
    """The larger of 64 chunks and 5% of the budget (never more than the budget)."""
    want = max(DEFAULT_WATERMARK_MIN_CHUNKS, int(capacity_chunks * DEFAULT_WATERMARK_FRACTION))
    return min(capacity_chunks, want)


class ManualClock:
    """A clock that moves only when told (tests)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self.now += seconds


@dataclass(frozen=True, slots=True)
class IdleSlot:
    """An idle slot, as the policy sees it: its mappings and when it went idle."""

    slot: int
    chunks: int
    idle_since: float


@dataclass(frozen=True)
class IdleReclaimPolicy:
    """``watermark_chunks``: the most idle mappings kept; ``timeout_s``: the longest a
    slot keeps them (None: no time limit)."""

    watermark_chunks: int
    timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.watermark_chunks < 0:
            raise ValueError(f"watermark_chunks must be >= 0, got {self.watermark_chunks}")
        if self.timeout_s is not None and not self.timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0 or None, got {self.timeout_s}")

    def expired(self, slot: IdleSlot, now: float) -> bool:
        return self.timeout_s is not None and now - slot.idle_since >= self.timeout_s

    def plan(self, slots: Sequence[IdleSlot], now: float) -> dict[int, int]:
        """Slot -> the chunks it keeps, for each slot that must lose some (others are
        left out). Afterwards no expired slot keeps a chunk, and the idle slots keep
        at most ``watermark_chunks`` in all: the fewest cuts that achieve both."""
        keep = {s.slot: (0 if self.expired(s, now) else s.chunks) for s in slots}
        excess = sum(keep.values()) - self.watermark_chunks
        for s in sorted(slots, key=lambda s: (s.idle_since, s.slot)):  # oldest first
            if excess <= 0:
                break
            cut = min(excess, keep[s.slot])
            keep[s.slot] -= cut
            excess -= cut
        return {s.slot: keep[s.slot] for s in slots if keep[s.slot] < s.chunks}

    def deadline(self, slots: Sequence[IdleSlot]) -> float | None:
        """When the next slot with chunks expires (None: never)."""
        if self.timeout_s is None:
            return None
        times = [s.idle_since for s in slots if s.chunks]
        return min(times) + self.timeout_s if times else None
