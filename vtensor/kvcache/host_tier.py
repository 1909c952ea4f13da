"""The host KV tier's books: which host slot holds which chunk of a swapped-out request.

Torch-free. The tier is a fixed number of host *slots*, one KV chunk each (the
engine backs them with one pinned buffer, ``engine/swap.py``). A swapped-out
request's private chunks ``[first, end)`` of its arena slot each take one host
slot. Every chunk of a request is in exactly one place at a time:

* **GPU**: mapped in its arena slot (the KV manager's books);
* **copying out** (``begin_out``): host slots reserved, the GPU chunks still
  mapped and read by the copy; ``end_out`` makes it **host** and only then may
  the GPU chunks be unmapped;
* **host** (resident): the GPU chunks are back in the pool;
* **copying in** (``begin_in``): fresh GPU chunks mapped at the same indices are
  being written from the host slots; ``end_in`` frees the host slots (the copy
  no longer reads them) and the chunks are on the GPU again.

``drop`` forgets a request in any state (abort); its host slots come back at
once, because the engine only drops a request after its copy has completed (a
copy-out is finished before ``end_out``; a copy-in is ordered before any later
copy that could reuse the slots: one in-order copy stream).

The tier is shared with prefix-cache spill (``radix_spill.py``): a spilled cache
block is an extent too, keyed by a **spill key**, a negative int (request ids are
>= 0), with the same states (copying out, host, copying in).

Invariants (``violations``): every host slot is free or held by exactly one
key; ``used + free == capacity``.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass


class SwapState(enum.Enum):
    COPYING_OUT = "copying-out"
    HOST = "host"
    COPYING_IN = "copying-in"


@dataclass(frozen=True)
class HostExtent:
    """Where a swapped request's chunks ``[first, first + len(host_slots))`` live."""

    rid: int
    first: int  # the first chunk index of its arena slot that was copied
    host_slots: tuple[int, ...]  # one host slot per chunk, in chunk order
    state: SwapState

    @property
    def count(self) -> int:
        return len(self.host_slots)


@dataclass(frozen=True)
class HostTierUsage:
    capacity_slots: int
    used_slots: int  # by swapped requests and spilled cache blocks
    requests: int  # swapped requests (keys >= 0)
    spill_slots: int = 0  # held by spilled cache blocks (negative keys)
    spill_blocks: int = 0


class HostTier(ABC):
    """A tier below the GPU pool that holds swapped-out chunks (the pluggable part).

    Contract: ``begin_out`` either reserves ``count`` slots for ``rid`` and returns
    its extent, or returns None and changes nothing (a full tier: the caller
    recomputes instead). State moves only COPYING_OUT -> HOST -> COPYING_IN and
    then out of the tier (``end_in``); ``drop`` leaves from any state. Every method
    on a request in the wrong state raises ``ValueError`` and changes nothing.
    """

    @abstractmethod
    def begin_out(self, rid: int, first: int, count: int) -> HostExtent | None: ...

    @abstractmethod
    def end_out(self, rid: int) -> HostExtent: ...

    @abstractmethod
    def begin_in(self, rid: int) -> HostExtent: ...

    @abstractmethod
    def end_in(self, rid: int) -> None: ...

    @abstractmethod
    def drop(self, rid: int) -> None: ...

    @abstractmethod
    def extent(self, rid: int) -> HostExtent | None: ...

    @abstractmethod
    def usage(self) -> HostTierUsage: ...

    @abstractmethod
    def held_keys(self) -> list[int]:
        """Every key in the tier (requests' ids and spill keys)."""

    @abstractmethod
    def violations(self) -> list[str]: ...


class SlotHostTier(HostTier):
    """``capacity_slots`` chunk-sized host slots, lowest free slot first."""

    def __init__(self, capacity_slots: int) -> None:
        if capacity_slots < 0:
            raise ValueError(f"capacity_slots must be >= 0, got {capacity_slots}")
        self.capacity_slots = capacity_slots
        self._free = list(range(capacity_slots - 1, -1, -1))  # a stack: pop() is lowest
        self._extents: dict[int, HostExtent] = {}

    def begin_out(self, rid: int, first: int, count: int) -> HostExtent | None:
        if rid in self._extents:
            raise ValueError(f"request {rid} is already in the host tier")
        if count < 0 or first < 0:
            raise ValueError(f"a swap-out needs count, first >= 0, got {count}, {first}")
        if count > len(self._free):
            return None
        slots = tuple(self._free.pop() for _ in range(count))
        ext = HostExtent(rid, first, slots, SwapState.COPYING_OUT)
        self._extents[rid] = ext
        return ext

    def end_out(self, rid: int) -> HostExtent:
        return self._move(rid, SwapState.COPYING_OUT, SwapState.HOST)

    def begin_in(self, rid: int) -> HostExtent:
        return self._move(rid, SwapState.HOST, SwapState.COPYING_IN)

    def end_in(self, rid: int) -> None:
        self._move(rid, SwapState.COPYING_IN, SwapState.COPYING_IN)
        self.drop(rid)

    def drop(self, rid: int) -> None:
        ext = self._extents.pop(rid, None)
        if ext is None:
            raise ValueError(f"request {rid} is not in the host tier")
        self._free.extend(reversed(ext.host_slots))
        self._free.sort(reverse=True)

    def extent(self, rid: int) -> HostExtent | None:
        return self._extents.get(rid)

    def usage(self) -> HostTierUsage:
        used = self.capacity_slots - len(self._free)
        spills = [e for k, e in self._extents.items() if k < 0]
        requests = len(self._extents) - len(spills)
        spill_slots = sum(e.count for e in spills)
        return HostTierUsage(self.capacity_slots, used, requests, spill_slots, len(spills))

    def held_keys(self) -> list[int]:
        return list(self._extents)

    def violations(self) -> list[str]:
        held = [s for e in self._extents.values() for s in e.host_slots]
        problems = []
        if len(held) != len(set(held)):
            problems.append("a host slot is held by two requests")
        if set(held) & set(self._free):
            problems.append("a host slot is both free and held")
        if len(held) + len(self._free) != self.capacity_slots:
            problems.append("host slots lost: held + free != capacity")
        return [f"host tier: {p}" for p in problems]

    def _move(self, rid: int, old: SwapState, new: SwapState) -> HostExtent:
        ext = self._extents.get(rid)
        if ext is None or ext.state is not old:
            state = "absent" if ext is None else ext.state.value
            raise ValueError(f"request {rid} is {state} in the host tier, not {old.value}")
        moved = HostExtent(rid, ext.first, ext.host_slots, new)
        self._extents[rid] = moved
        return moved
