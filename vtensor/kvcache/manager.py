"""KV cache bookkeeping: request slots and how many chunks each has mapped.

Torch-free on purpose: it decides, in plain integers, which chunk ranges to
map or unmap, and emits them as commands; ``KVArena`` carries them out on the
virtual tensor through the asynchronous mapper. The scheduler asks it whether
a request fits and tells it when requests grow or finish.

Each slot owns a fixed, chunk-aligned byte range of the arena, and its
mapped chunks always form a prefix of that range (KV grows from token 0).

Invariants (listed by ``violations``, asserted by ``check``):

* ``sum(mapped) == committed <= capacity_chunks`` — the pool can never run
  dry under a command, because unmaps are emitted before the maps that reuse
  their chunks, and the mapper applies commands in order;
* a slot is either owned by exactly one request or idle; an idle slot may keep
  chunks mapped (deferred reclamation), at most ``keep_idle_chunks`` in all;
* a running slot reused from a longer request may map more than its request
  has asked for (``surplus``); like idle chunks, surplus is taken back first
  when another request needs chunks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KVGeometry:
    """Runtime-derived sizes of the arena (plain integers)."""

    num_slots: int
    max_tokens: int  # per slot; slot_bytes is a whole number of chunks
    bytes_per_token: int
    chunk_size: int
    capacity_chunks: int

    def __post_init__(self) -> None:
        if min(self.num_slots, self.max_tokens, self.bytes_per_token, self.chunk_size) <= 0:
            raise ValueError(f"KV geometry sizes must be positive: {self}")
        if self.slot_bytes % self.chunk_size:
            raise ValueError("a slot must be a whole number of chunks")

    @property
    def slot_bytes(self) -> int:
        return self.max_tokens * self.bytes_per_token

    @property
    def chunks_per_slot(self) -> int:
        return self.slot_bytes // self.chunk_size

    def chunks_for(self, tokens: int) -> int:
        return math.ceil(min(tokens, self.max_tokens) * self.bytes_per_token / self.chunk_size)

    @staticmethod
    def aligned_max_tokens(max_tokens: int, bytes_per_token: int, chunk_size: int) -> int:
        """The smallest length ≥ ``max_tokens`` whose slot is a whole number of chunks."""
        step = chunk_size // math.gcd(chunk_size, bytes_per_token)
        return math.ceil(max_tokens / step) * step


@dataclass(frozen=True)
class MapCommand:
    """Map fresh chunks at chunk indices ``[first, first+count)`` of ``slot``."""

    slot: int
    first: int
    count: int


@dataclass(frozen=True)
class UnmapCommand:
    slot: int
    first: int
    count: int


KVCommand = MapCommand | UnmapCommand


@dataclass(frozen=True)
class KVUsage:
    running_slots: int
    idle_slots_with_chunks: int
    committed_chunks: int
    idle_chunks: int  # kept on purpose by deferred reclamation
    surplus_chunks: int  # running slots' chunks beyond what their requests asked for
    capacity_chunks: int


class KVCacheManager:
    def __init__(
        self,
        geometry: KVGeometry,
        keep_idle_chunks: int | None = None,
        reserved_slots: int = 0,
    ) -> None:
        """Slots ``[0, reserved_slots)`` belong to the caller and are never handed out;
        their chunks are not counted in ``geometry.capacity_chunks``."""
        if not 0 <= reserved_slots < geometry.num_slots:
            raise ValueError(f"reserved_slots must be in [0, {geometry.num_slots})")
        self.geometry = geometry
        self.reserved_slots = reserved_slots
        self.keep_idle_chunks = (
            geometry.capacity_chunks if keep_idle_chunks is None else keep_idle_chunks
        )
        self._mapped = [0] * geometry.num_slots
        self._asked = [0] * geometry.num_slots  # chunks the owner has asked for so far
        self._owner: dict[int, int] = {}  # request id -> slot
        self._idle: set[int] = set(range(reserved_slots, geometry.num_slots))
        self._committed = 0
        self._commands: list[KVCommand] = []

    # ------------------------------------------------------------------ query
    @property
    def free_chunks(self) -> int:
        return self.geometry.capacity_chunks - self._committed

    @property
    def idle_chunks(self) -> int:
        return sum(self._mapped[s] for s in self._idle)

    @property
    def surplus_chunks(self) -> int:
        return sum(self._mapped[s] - self._asked[s] for s in self._owner.values())

    @property
    def reclaimable_chunks(self) -> int:
        return self.idle_chunks + self.surplus_chunks

    def slot_of(self, rid: int) -> int:
        return self._owner[rid]

    def mapped_chunks(self, rid: int) -> int:
        return self._mapped[self._owner[rid]]

    def has_free_slot(self) -> bool:
        return bool(self._idle)

    def can_admit(self, tokens: int, headroom_chunks: int = 0) -> bool:
        """Whether a new request of ``tokens`` fits now, leaving ``headroom_chunks`` free."""
        if not self._idle:
            return False
        slot = self._best_slot(self.geometry.chunks_for(tokens))
        extra = self.geometry.chunks_for(tokens) - self._mapped[slot]
        spare = self.free_chunks + self.reclaimable_chunks - self._mapped[slot]
        return extra <= spare - headroom_chunks

    def usage(self) -> KVUsage:
        idle = [s for s in self._idle if self._mapped[s]]
        return KVUsage(
            len(self._owner),
            len(idle),
            self._committed,
            self.idle_chunks,
            self.surplus_chunks,
            self.geometry.capacity_chunks,
        )

    # ---------------------------------------------------------------- updates
    def admit(self, rid: int, tokens: int) -> int | None:
        """Give request ``rid`` a slot mapped for ``tokens``; None if it does not fit."""
        if rid in self._owner:
            raise ValueError(f"request {rid} already holds slot {self._owner[rid]}")
        if not self._idle:
            return None
        slot = self._best_slot(self.geometry.chunks_for(tokens))
        self._idle.discard(slot)
        self._owner[rid] = slot
        if not self.grow(rid, tokens):
            del self._owner[rid]
            self._idle.add(slot)
            return None
        return slot

    def grow(self, rid: int, tokens: int, steal: bool = True) -> bool:
        """Ensure ``rid``'s slot maps its first ``tokens`` tokens.

        Takes free chunks, then (if ``steal``) unmaps idle slots' chunks and
        other requests' surplus. On False nothing changed: the caller preempts
        someone and retries.
        """
        slot = self._owner[rid]
        want = self.geometry.chunks_for(tokens)
        need = want - self._mapped[slot]
        if need <= 0:
            self._asked[slot] = max(self._asked[slot], want)
            return True
        asked = self._asked[slot]
        self._asked[slot] = self._mapped[slot]  # its own chunks are not surplus to steal
        if need > self.free_chunks and (not steal or not self._reclaim(need - self.free_chunks)):
            self._asked[slot] = asked
            return False
        self._commands.append(MapCommand(slot, self._mapped[slot], need))
        self._mapped[slot] += need
        self._asked[slot] = want
        self._committed += need
        return True

    def premap(self, token_counts: Sequence[int], headroom_chunks: int = 0) -> None:
        """Map idle slots ahead for requests expected next (the head of the waiting
        queue, ``token_counts`` each), so their admission finds the chunks mapped and the
        step that admits them does not wait on the mapper. Only free chunks are used
        (leaving ``headroom_chunks`` free, nothing stolen), within ``keep_idle_chunks``.
        The slots stay idle: these chunks are reclaimable like any idle slot's."""
        taken: set[int] = set()
        for tokens in token_counts:
            want = self.geometry.chunks_for(tokens)
            candidates = self._idle - taken
            if not candidates:
                return
            slot = self._best_slot(want, candidates)  # the slot admit() will pick
            taken.add(slot)
            need = want - self._mapped[slot]
            if need <= 0:
                continue
            if need > self.free_chunks - headroom_chunks:
                return
            if self.idle_chunks + need > self.keep_idle_chunks:
                return
            self._commands.append(MapCommand(slot, self._mapped[slot], need))
            self._mapped[slot] += need
            self._committed += need

    def release(self, rid: int) -> None:
        """The request is done (or preempted): its slot idles, keeping its chunks."""
        slot = self._owner.pop(rid)
        self._asked[slot] = 0
        self._idle.add(slot)
        excess = self.idle_chunks - self.keep_idle_chunks
        if excess > 0:
            self._unmap_tail(slot, min(excess, self._mapped[slot]))

    def reclaim_all(self) -> None:
        """Unmap every idle slot's chunks (shutdown, or a caller that needs the pool)."""
        self._reclaim(self.idle_chunks)

    def take_commands(self) -> list[KVCommand]:
        """Take the commands emitted since the last take, in the order they must run."""
        commands, self._commands = self._commands, []
        return commands

    def pending_commands(self) -> tuple[KVCommand, ...]:
        """The commands emitted but not taken yet (read-only: integrity checks)."""
        return tuple(self._commands)

    def owners(self) -> dict[int, int]:
        """Request id -> slot, for every slot in use (a copy)."""
        return dict(self._owner)

    def violations(self) -> list[str]:
        """The broken invariants, described; empty when the books are consistent."""
        geo, owned = self.geometry, list(self._owner.values())
        checks = [
            (sum(self._mapped) == self._committed, "sum(mapped) != committed"),
            (self._committed <= geo.capacity_chunks, "committed > capacity"),
            (len(set(owned)) == len(owned), "a slot is owned by two requests"),
            (self._idle.isdisjoint(owned), "a slot is both idle and owned"),
            (min([*owned, *self._idle], default=self.reserved_slots) >= self.reserved_slots,
             "a reserved slot is handed out"),
            (len(self._idle) + len(owned) == geo.num_slots - self.reserved_slots,
             "slots lost: idle + owned != all unreserved slots"),
            (all(0 <= m <= geo.chunks_per_slot for m in self._mapped),
             "a slot maps fewer than 0 or more than its chunks"),
            (all(self._asked[s] == 0 for s in self._idle), "an idle slot has asked chunks"),
            (all(self._asked[s] <= self._mapped[s] for s in owned), "asked > mapped"),
        ]  # fmt: skip
        return [f"KV manager: {what}" for ok, what in checks if not ok]

    def check(self) -> None:
        problems = self.violations()
        if problems:
            raise AssertionError("; ".join(problems))

    # ---------------------------------------------------------------- private
    def _best_slot(self, chunks: int, among: set[int] | None = None) -> int:
        """Best fit among idle slots: the smallest that covers ``chunks``, else the largest."""
        idle = self._idle if among is None else among
        covering = [s for s in idle if self._mapped[s] >= chunks]
        if covering:
            return min(covering, key=lambda s: (self._mapped[s], s))
        return max(idle, key=lambda s: (self._mapped[s], -s))

    def _reclaim(self, chunks: int) -> bool:
        """Unmap ``chunks`` from idle slots (largest first), then from running slots'
        surplus; False (and nothing done) if they hold fewer."""
        if chunks > self.reclaimable_chunks:
            return False
        running = list(self._owner.values())
        for slot in [*sorted(self._idle, key=lambda s: -self._mapped[s]), *running]:
            if chunks <= 0:
                break
            take = min(chunks, self._mapped[slot] - self._asked[slot])
            if take > 0:
                self._unmap_tail(slot, take)
                chunks -= take
        return True

    def _unmap_tail(self, slot: int, count: int) -> None:
        self._mapped[slot] -= count
        self._committed -= count
        self._commands.append(UnmapCommand(slot, self._mapped[slot], count))
