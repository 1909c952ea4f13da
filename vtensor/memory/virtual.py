"""VirtualTensor: a reserved virtual range, backed chunk by chunk on demand.

The range is reserved once and never moves; mapping more chunks grows the
backed part in place, so views (and, later, CUDA graphs) taken earlier stay
valid. The same physical chunk may be mapped into several virtual tensors, or
at several offsets of one, through :meth:`VirtualTensor.map_chunks`: each
mapping holds one pool reference, and the chunk is recycled only when its
last mapping goes.

A range may also hold chunks of *another* pool whose backend can map into this
one's reservations (``map``/``map_chunks`` with ``pool=``): host-located CUDA
chunks in a device range, say (heterogeneous mapping). Each such chunk's
reference is its own pool's, and goes back there.

Invariant: ``self._table[i]`` is the chunk mapped at byte offset
``i * chunk_size``, or ``None``; every non-``None`` entry holds exactly one
reference of its pool: ``self._owners[i]`` where ``i`` is there, else
``self.pool``. Every public method keeps it, also when it raises.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from vtensor.intervals import runs

from .backend import PhysicalChunk
from .errors import ClosedError, MappingError, NotMappedError, OutOfRangeError, OverlapError
from .pool import ChunkPool
from .strided import strided_layout


class VirtualTensor:
    """A fixed-address virtual byte range over a :class:`ChunkPool`'s backend."""

    def __init__(self, pool: ChunkPool, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"a virtual tensor needs a positive size, got {nbytes}")
        self.pool = pool
        self.chunk_size = pool.chunk_size
        self.num_chunks = math.ceil(nbytes / self.chunk_size)
        self.nbytes = self.num_chunks * self.chunk_size
        self._backend = pool.backend
        self.va = self._backend.reserve(self.nbytes)
        self._table: list[PhysicalChunk | None] = [None] * self.num_chunks
        self._owners: dict[int, ChunkPool] = {}  # chunk index -> its pool, if not self.pool
        self._mapped = 0
        self._lock = threading.RLock()
        self._closed = False
        self._typed: dict[torch.dtype, torch.Tensor] = {}

    # ------------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def mapped_chunks(self) -> int:
        return self._mapped

    @property
    def mapped_bytes(self) -> int:
        return self._mapped * self.chunk_size

    def mapped_indices(self) -> list[int]:
        """The indices of the chunks mapped now, ascending (chunk ``i`` backs bytes
        ``[i * chunk_size, (i + 1) * chunk_size)``)."""
        with self._lock:
            return [i for i, c in enumerate(self._table) if c is not None]

    def mapped_table(self) -> list[tuple[int, PhysicalChunk]]:
        """``(index, chunk)`` for each chunk mapped now, ascending (the same chunk may
        appear at several indices: ``map_chunks`` shares it)."""
        with self._lock:
            return [(i, c) for i, c in enumerate(self._table) if c is not None]

    def is_mapped(self, offset: int, nbytes: int) -> bool:
        """True when every chunk touching ``[offset, offset+nbytes)`` is mapped."""
        first, last = self._chunk_range(offset, nbytes, aligned=False)
        with self._lock:
            return all(self._table[i] is not None for i in range(first, last))

    def chunks(self, offset: int, nbytes: int) -> list[PhysicalChunk]:
        """The chunks mapped over ``[offset, offset+nbytes)`` (all must be mapped, and
        all ``self.pool``'s: callers take references to them there)."""
        first, last = self._chunk_range(offset, nbytes, aligned=True)
        with self._lock:
            self._check_open()
            found = self._table[first:last]
            if any(c is None for c in found):
                raise NotMappedError(f"[{offset}, {offset + nbytes}) is not fully mapped")
            foreign = [i for i in range(first, last) if i in self._owners]
            if foreign:
                raise MappingError(f"chunk(s) {foreign[:8]} are another pool's, not this one's")
            return [c for c in found if c is not None]

    def owner(self, index: int) -> ChunkPool:
        """The pool whose chunk is mapped at chunk ``index``."""
        with self._lock:
            if not 0 <= index < self.num_chunks or self._table[index] is None:
                raise NotMappedError(f"chunk {index} is not mapped")
            return self._owners.get(index, self.pool)

    # ---------------------------------------------------------------- mapping
    def map(self, offset: int, nbytes: int, pool: ChunkPool | None = None) -> int:
        """Back ``[offset, offset+nbytes)`` (rounded up to chunks) with fresh chunks of
        ``pool`` (default ``self.pool``; another pool's backend must be able to map into
        this one's reservations: ``PhysicalBackend.can_map_chunks_of``).

        Returns the number of chunks mapped.
        """
        first, last = self._chunk_range(offset, nbytes, aligned=True)
        source = self._source(pool)
        with self._lock:
            self._check_open()
            self._require_unmapped(first, last)
            chunks = source.acquire(last - first)
            self._install(first, chunks, source)
            return last - first

    def map_chunks(
        self, offset: int, chunks: Sequence[PhysicalChunk], pool: ChunkPool | None = None
    ) -> None:
        """Map existing in-use ``chunks`` (of ``pool``, default ``self.pool``) at
        ``offset``, sharing them (zero copy)."""
        first, last = self._chunk_range(offset, len(chunks) * self.chunk_size, aligned=True)
        source = self._source(pool)
        with self._lock:
            self._check_open()
            self._require_unmapped(first, last)
            source.retain(chunks)
            self._install(first, list(chunks), source)

    def ensure_mapped(self, offset: int, nbytes: int) -> int:
        """Map fresh chunks into every hole of the range; returns how many were mapped.

        This is how a tensor grows: its address and existing mappings stay put.
        """
        first, last = self._chunk_range(offset, nbytes, aligned=False)
        with self._lock:
            self._check_open()
            holes = [i for i in range(first, last) if self._table[i] is None]
            if not holes:
                return 0
            chunks = self.pool.acquire(len(holes))
            installed: list[tuple[int, int]] = []
            pos = 0
            try:
                for start, length in runs(holes):
                    pos += length  # _install releases this run's chunks if it fails
                    self._install(start, chunks[pos - length : pos], self.pool)
                    installed.append((start, length))
            except BaseException:
                self.pool.release(chunks[pos:])
                for start, length in installed:
                    self._uninstall(start, start + length)
                raise
            return len(holes)

    def unmap(self, offset: int, nbytes: int) -> int:
        """Unmap ``[offset, offset+nbytes)``, dropping one reference per chunk.

        Returns the number of chunks unmapped.
        """
        first, last = self._chunk_range(offset, nbytes, aligned=True)
        with self._lock:
            self._check_open()
            missing = [i for i in range(first, last) if self._table[i] is None]
            if missing:
                raise NotMappedError(
                    f"cannot unmap [{offset}, {offset + nbytes}): chunk(s) {missing[:8]} not mapped"
                )
            self._uninstall(first, last)
            return last - first

    def close(self) -> None:
        """Unmap everything, return the chunks to the pool, free the reservation."""
        with self._lock:
            if self._closed:
                raise ClosedError("virtual tensor already closed")
            mapped = [i for i, c in enumerate(self._table) if c is not None]
            for start, length in runs(mapped):
                self._uninstall(start, start + length)
            self._typed.clear()
            self._backend.free_reservation(self.va, self.nbytes)
            self._closed = True

    def __enter__(self) -> VirtualTensor:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.close()

    # ------------------------------------------------------------------ views
    def view(
        self,
        dtype: torch.dtype,
        shape: Sequence[int],
        strides: Sequence[int] | None = None,
        offset: int = 0,
    ) -> torch.Tensor:
        """A zero-copy tensor over the range, with any dtype, shape and strides.

        ``offset`` is in bytes and must be a multiple of the dtype's size;
        ``strides`` are in elements (contiguous when omitted). The view may
        cover unmapped chunks (map them before touching those bytes), and is
        valid until :meth:`close`.
        """
        layout = strided_layout(dtype.itemsize, shape, strides, offset, self.nbytes)
        with self._lock:
            self._check_open()
            typed = self._typed.get(dtype)
            if typed is None:
                typed = self._backend.byte_view(self.va, self.nbytes).view(dtype)
                self._typed[dtype] = typed
        return typed.as_strided(layout.shape, layout.strides, layout.start)

    # ---------------------------------------------------------------- private
    def _chunk_range(self, offset: int, nbytes: int, aligned: bool) -> tuple[int, int]:
        """Chunk indices ``[first, last)`` of a byte range, validated."""
        if nbytes <= 0:
            raise OutOfRangeError(f"empty or negative range ({nbytes} bytes)")
        if aligned and offset % self.chunk_size:
            raise OutOfRangeError(f"offset {offset} is not a multiple of {self.chunk_size}")
        if offset < 0 or offset + nbytes > self.nbytes:
            raise OutOfRangeError(
                f"range [{offset}, {offset + nbytes}) is outside the {self.nbytes}-byte reservation"
            )
        return offset // self.chunk_size, math.ceil((offset + nbytes) / self.chunk_size)

    def _require_unmapped(self, first: int, last: int) -> None:
        taken = [i for i in range(first, last) if self._table[i] is not None]
        if taken:
            raise OverlapError(f"chunk(s) {taken[:8]} of the range are already mapped")

    def _source(self, pool: ChunkPool | None) -> ChunkPool:
        """The pool to take chunks from: ours, or another whose chunks map here."""
        if pool is None or pool is self.pool:
            return self.pool
        if pool.chunk_size != self.chunk_size or not self._backend.can_map_chunks_of(pool.backend):
            raise ValueError(
                f"chunks of a {pool.backend.name} backend ({pool.backend.location}-located, "
                f"{pool.chunk_size}-byte chunks) cannot be mapped into this "
                f"{self._backend.name} reservation ({self.chunk_size}-byte chunks)"
            )
        return pool

    def _install(self, first: int, chunks: list[PhysicalChunk], pool: ChunkPool) -> None:
        """Map ``chunks`` (whose references of ``pool`` the caller holds) from chunk
        ``first`` on.

        On failure the partial mappings are undone and the references dropped,
        so the caller sees no change.
        """
        cs, done = self.chunk_size, 0
        try:
            for i, chunk in enumerate(chunks):
                # The chunk's own backend maps it (its handle); our backend grants access.
                pool.backend.map(self.va + (first + i) * cs, chunk)
                done += 1
            # One access call for the whole run: it is the dominant cost per call.
            self._backend.set_access(self.va + first * cs, len(chunks) * cs)
        except BaseException:
            if done:
                self._backend.unmap(self.va + first * cs, done * cs)
            pool.release(chunks)
            raise
        self._table[first : first + len(chunks)] = chunks
        if pool is not self.pool:
            self._owners.update(dict.fromkeys(range(first, first + len(chunks)), pool))
        self._mapped += len(chunks)

    def _uninstall(self, first: int, last: int) -> None:
        found = self._table[first:last]
        self._backend.unmap(self.va + first * self.chunk_size, (last - first) * self.chunk_size)
        self._table[first:last] = [None] * (last - first)
        chunks = [c for c in found if c is not None]
        self._mapped -= len(chunks)
        if not self._owners:  # every chunk is ours: the one path before pools could mix
            self.pool.release(chunks)
            return
        by_pool: dict[int, tuple[ChunkPool, list[PhysicalChunk]]] = {}
        for i, chunk in enumerate(found, start=first):
            if chunk is not None:
                owner = self._owners.pop(i, self.pool)
                by_pool.setdefault(id(owner), (owner, []))[1].append(chunk)
        for owner, owned in by_pool.values():
            owner.release(owned)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("virtual tensor is closed")
