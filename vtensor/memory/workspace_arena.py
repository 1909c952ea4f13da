"""WorkspaceArena: the forward pass's workspace, carved out of the KV's chunk pool.

eLLM's unified pool (issue 19): activations and KV draw on **one** pool of physical
chunks. The arena reserves one virtual range (as large as the pool could ever give
it) and serves allocations of whole chunks out of it: each allocation takes fresh
chunks from the shared :class:`ChunkPool` and maps them at a free run of the range;
freeing unmaps them, and the chunks go back to the pool, where the KV can take them.

Its client is torch's caching allocator (``torch_workspace.py``): torch asks for
*segments* (whole multiples of 2 MiB, the chunk size on CUDA) and keeps them cached
until told to release them, so the arena is called when the workspace grows or
shrinks, not per tensor.

Invariant: every allocation is a run of ``chunks`` mapped chunks starting at a
chunk boundary, recorded in ``_live`` by its address; the runs are disjoint, and
``held_chunks`` is their total, which is also what this arena holds of the pool.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import MappingError, PoolExhaustedError
from .pool import ChunkPool
from .virtual import VirtualTensor


@dataclass(frozen=True)
class ArenaStats:
    """What the arena holds now, its peak since the last ``reset_peak``, and counts."""

    held_chunks: int
    peak_chunks: int
    allocations: int  # live runs
    grows: int  # allocations served since the arena opened
    frees: int  # runs freed since the arena opened
    refused: int  # allocations refused: the pool or the range had no room


class WorkspaceArena:
    """Whole-chunk allocations mapped from ``pool`` in one reserved range."""

    def __init__(self, pool: ChunkPool, max_bytes: int) -> None:
        self.pool = pool
        self.chunk_size = pool.chunk_size
        self._range = VirtualTensor(pool, max_bytes)
        self.va = self._range.va
        self.num_chunks = self._range.num_chunks
        self._lock = threading.Lock()
        self._live: dict[int, int] = {}  # address -> chunks of the run starting there
        self._held = self._peak = 0
        self._grows = self._frees = self._refused = 0

    @property
    def closed(self) -> bool:
        return self._range.closed

    def allocate(self, nbytes: int) -> int:
        """Map ``ceil(nbytes / chunk_size)`` fresh chunks at a free run; their address.

        Raises :class:`PoolExhaustedError` when the pool, or the range, has no room
        (nothing changes then).
        """
        if nbytes <= 0:
            raise ValueError(f"cannot allocate {nbytes} bytes")
        n = -(-nbytes // self.chunk_size)
        with self._lock:
            first = self._first_fit(n)
            if first is None:
                self._refused += 1
                raise PoolExhaustedError(nbytes, self._largest_run() * self.chunk_size)
            try:
                self._range.map(first * self.chunk_size, n * self.chunk_size)
            except PoolExhaustedError:
                self._refused += 1
                raise
            address = self.va + first * self.chunk_size
            self._live[address] = n
            self._held += n
            self._peak = max(self._peak, self._held)
            self._grows += 1
            return address

    def free(self, address: int) -> None:
        """Unmap the run allocated at ``address``; its chunks go back to the pool (a
        no-op once the arena is closed: ``close`` unmapped everything)."""
        with self._lock:
            if self._range.closed:
                return  # closed under torch's feet (the engine closed): nothing is mapped
            n = self._live.pop(address, None)
            if n is None:
                raise MappingError(f"{address:#x} is not an allocation of this arena")
            self._range.unmap(address - self.va, n * self.chunk_size)
            self._held -= n
            self._frees += 1

    @property
    def held_chunks(self) -> int:
        return self._held

    def stats(self) -> ArenaStats:
        with self._lock:
            return ArenaStats(
                self._held, self._peak, len(self._live), self._grows, self._frees, self._refused
            )

    def reset_peak(self) -> None:
        with self._lock:
            self._peak = self._held

    def close(self) -> None:
        """Unmap everything left and free the range (the caller's allocations end)."""
        with self._lock:
            self._live.clear()
            self._held = 0
            if not self._range.closed:
                self._range.close()

    def _first_fit(self, n: int) -> int | None:
        """The first chunk index of a free run of ``n`` chunks, if any (lock held)."""
        return next((start for start, length in self._gaps() if length >= n), None)

    def _largest_run(self) -> int:
        return max(length for _, length in self._gaps())

    def _gaps(self) -> Iterator[tuple[int, int]]:
        """``(first chunk, length)`` of each free run, in address order, the one after
        the last allocation included (possibly empty) (lock held)."""
        start = 0
        for address in sorted(self._live):
            first = (address - self.va) // self.chunk_size
            yield start, first - start
            start = first + self._live[address]
        yield start, self.num_chunks - start
