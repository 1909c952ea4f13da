"""KVArena: the KV cache of every request slot in one virtual tensor.

The arena reserves ``num_slots × slot_bytes`` of address space once; slot
``s`` starts at byte ``s × slot_bytes``, i.e. at row ``s × max_tokens`` of
every layer view, and those addresses never move (CUDA graphs rely on it).
``KVCacheManager`` decides what to map; the arena applies its commands on the
:class:`AsyncMapper` and, before a forward step, waits only for the chunks
that step will touch — normally long done, because they were mapped ahead.

The prefix cache's pool references live here too: ``held`` maps each logical
chunk id the cache holds to its physical chunk (``arena_ops.py``), so a cache
hit maps those chunks into another slot with ``VirtualTensor.map_chunks``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from vtensor.memory import (
    AsyncMapper,
    ChunkPool,
    EnsureMapped,
    MapperOp,
    PhysicalChunk,
    Trim,
    Unmap,
    VirtualTensor,
)
from vtensor.memory.mapper import MapTicket

from .arena_ops import DropChunks, HoldChunks, MapHeld
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
from .layout import KVLayout


@dataclass(frozen=True)
class ArenaStats:
    mapped_bytes: int
    waits: int  # times a step had to block on the mapper
    wait_s: float  # total time blocked
    mapper_busy_s: float
    chunks_mapped: int  # over the arena's life (mapper ops)


@dataclass(frozen=True)
class ChunkSignature:
    """The arena's mappings and the cache's holds up to a renaming of physical chunks.

    Physical chunks are numbered in the order they are first met: the mapped chunk
    indices ascending, then the held ids ascending. Two arenas (two tensor-parallel
    ranks') that applied the same commands have equal signatures, whichever physical
    chunks their pools handed out; a missed or extra map, share, hold or drop changes it.
    """

    mapped: tuple[tuple[int, int], ...]  # (chunk index, label)
    held: tuple[tuple[int, int], ...]  # (logical chunk id, label)
    references: tuple[int, ...]  # the pool's reference count of each label


class KVArena:
    def __init__(self, layout: KVLayout, pool: ChunkPool, device: torch.device) -> None:
        self.layout = layout
        self.pool = pool
        chunk = pool.chunk_size
        if layout.slot_stride * layout.itemsize % chunk:
            raise ValueError("layout.max_tokens must make each slot a whole number of chunks")
        self.geometry = KVGeometry(
            num_slots=layout.num_slots,
            max_tokens=layout.max_tokens,
            bytes_per_token=layout.bytes_per_token,
            chunk_size=chunk,
            capacity_chunks=pool.capacity_chunks,
        )
        self.vt = VirtualTensor(pool, layout.total_bytes)
        self.mapper = AsyncMapper(pool.backend)
        self.tensor = self.vt.view(layout.dtype, layout.shape, layout.strides)
        if self.tensor.device.type != device.type:
            raise ValueError(f"arena memory is on {self.tensor.device}, not {device}")
        self.views = [
            (layout.k_view(self.tensor, i), layout.v_view(self.tensor, i))
            for i in range(layout.num_layers)
        ]
        # Submitted, maybe unfinished tickets, oldest first, with the (slot, first chunk)
        # of each range they map: a step needing chunks [0, n) of a slot waits for them.
        self._inflight: deque[tuple[MapTicket, list[tuple[int, int]]]] = deque()
        # Logical chunk id -> the chunk the prefix cache holds a reference to. Written by
        # the mapper thread's ops; read here only after ``wait_all``.
        self.held: dict[int, PhysicalChunk] = {}
        self._waits = 0
        self._wait_s = 0.0

    def apply(self, commands: Sequence[KVCommand]) -> None:
        """Queue the manager's commands on the mapper (in order); returns at once."""
        if not commands:
            return
        ops: list[MapperOp] = []
        maps: list[tuple[int, int]] = []
        for c in commands:
            ops.append(self._op(c))
            if isinstance(c, MapCommand | MapCachedCommand):
                maps.append((c.slot, c.first))
        self._inflight.append((self.mapper.submit(ops), maps))

    def _op(self, c: KVCommand) -> MapperOp:
        chunk = self.geometry.chunk_size
        if isinstance(c, CacheDropCommand):
            return DropChunks(self.vt, c.chunks, self.held)
        if isinstance(c, ReleaseFreeCommand):
            return Trim(self.pool, c.keep_free)
        offset = c.slot * self.geometry.slot_bytes + c.first * chunk
        if isinstance(c, MapCommand):
            return EnsureMapped(self.vt, offset, c.count * chunk)
        if isinstance(c, UnmapCommand):
            return Unmap(self.vt, offset, c.count * chunk)
        if isinstance(c, MapCachedCommand):
            return MapHeld(self.vt, offset, c.chunks, self.held)
        assert isinstance(c, CacheHoldCommand)
        return HoldChunks(self.vt, offset, c.chunks, self.held)

    def chunk_at(self, slot: int, index: int) -> PhysicalChunk:
        """The physical chunk mapped at a slot's chunk ``index`` (integrity checks)."""
        offset = slot * self.geometry.slot_bytes + index * self.geometry.chunk_size
        return self.vt.chunks(offset, self.geometry.chunk_size)[0]

    def signature(self) -> ChunkSignature:
        """See :class:`ChunkSignature` (call after ``wait_all``)."""
        labels: dict[int, int] = {}
        refs: list[int] = []

        def label(chunk: PhysicalChunk) -> int:
            if chunk.cid not in labels:
                labels[chunk.cid] = len(labels)
                refs.append(self.pool.refcount(chunk))
            return labels[chunk.cid]

        mapped = tuple((i, label(c)) for i, c in self.vt.mapped_table())
        held = tuple((cid, label(self.held[cid])) for cid in sorted(self.held))
        return ChunkSignature(mapped, held, tuple(refs))

    def wait_ready(self, needs: Iterable[tuple[int, int]]) -> None:
        """Block until each ``(slot, chunks)`` prefix is mapped; count the time blocked."""
        while self._inflight and self._inflight[0][0].done():
            self._inflight.popleft()[0].wait()  # done: only re-raises a mapper error, if any
        if not self._inflight:
            return
        need = dict(needs)
        last = -1
        for i, (_, maps) in enumerate(self._inflight):
            if any(first < need.get(slot, 0) for slot, first in maps):
                last = i
        if last < 0:
            return
        t0 = time.perf_counter()
        for _ in range(last + 1):
            self._inflight.popleft()[0].wait()
        self._waits += 1
        self._wait_s += time.perf_counter() - t0

    def wait_all(self) -> None:
        """Wait for every submitted command (shutdown, tests)."""
        while self._inflight:
            self._inflight.popleft()[0].wait()

    def stats(self) -> ArenaStats:
        m = self.mapper.stats()
        return ArenaStats(self.vt.mapped_bytes, self._waits, self._wait_s, m.busy_s, m.chunks)

    def close(self) -> None:
        """Finish pending commands, unmap everything, drop the cache's references and
        free the reservation."""
        self.wait_all()
        self.mapper.close()
        self.vt.close()
        self.pool.release(list(self.held.values()))
        self.held.clear()
