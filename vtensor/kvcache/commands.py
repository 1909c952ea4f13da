"""KV commands: what the torch-free KV manager asks the arena to do, in order.

Chunks are named by the manager's logical chunk ids (ints); the arena resolves
an id to its physical chunk only where it must: a chunk the prefix cache holds
(``CacheHoldCommand`` takes it from the slot that maps it, ``MapCachedCommand``
maps it elsewhere). Fresh chunks need no id on the arena's side.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MapCommand:
    """Map fresh chunks at chunk indices ``[first, first+count)`` of ``slot``."""

    slot: int
    first: int
    count: int


@dataclass(frozen=True)
class UnmapCommand:
    """Drop the mappings at chunk indices ``[first, first+count)`` of ``slot`` (a chunk
    returns to the pool when its last reference goes)."""

    slot: int
    first: int
    count: int


@dataclass(frozen=True)
class MapCachedCommand:
    """Map the cached chunks ``chunks`` at chunk indices ``first, first+1, ...`` of
    ``slot``, sharing them: one more pool reference each, no copy."""

    slot: int
    first: int
    chunks: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.chunks)


@dataclass(frozen=True)
class CacheHoldCommand:
    """The prefix cache takes one reference to each chunk mapped at chunk indices
    ``first, first+1, ...`` of ``slot``; ``chunks`` are their ids."""

    slot: int
    first: int
    chunks: tuple[int, ...]


@dataclass(frozen=True)
class CacheDropCommand:
    """The prefix cache lets go of its reference to each of ``chunks``."""

    chunks: tuple[int, ...]


@dataclass(frozen=True)
class ReleaseFreeCommand:
    """The pool releases its free chunks to the driver (``cuMemRelease``; on the host
    backend, a hole punched in the memfd), keeping ``keep_free``. Emitted after idle
    reclamation unmapped chunks (``KVCacheManager.reclaim_idle``): the held memory goes
    back, on the mapper thread, after every unmap queued before it."""

    keep_free: int = 0


KVCommand = (
    MapCommand
    | UnmapCommand
    | MapCachedCommand
    | CacheHoldCommand
    | CacheDropCommand
    | ReleaseFreeCommand
)
