"""VirtualTensor: a reserved virtual range, backed chunk by chunk on demand.

The range is reserved once and never moves; mapping more chunks grows the
backed part in place, so views (and, later, CUDA graphs) taken earlier stay
valid. The same physical chunk may be mapped into several virtual tensors, or
at several offsets of one, through :meth:`VirtualTensor.map_chunks`: each
mapping holds one pool reference, and the chunk is recycled only when its
last mapping goes.

Invariant: ``self._table[i]`` is the chunk mapped at byte offset
``i * chunk_size``, or ``None``; every non-``None`` entry holds exactly one
pool reference. Every public method keeps it, also when it raises.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from vtensor.intervals import runs

from .backend import PhysicalChunk
from .errors import ClosedError, NotMappedError, OutOfRangeError, OverlapError
from .pool import ChunkPool


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
        """The chunks mapped over ``[offset, offset+nbytes)`` (all must be mapped)."""
        first, last = self._chunk_range(offset, nbytes, aligned=True)
        with self._lock:
            self._check_open()
            found = self._table[first:last]
            if any(c is None for c in found):
                raise NotMappedError(f"[{offset}, {offset + nbytes}) is not fully mapped")
            return [c for c in found if c is not None]

    # ---------------------------------------------------------------- mapping
    def map(self, offset: int, nbytes: int) -> int:
        """Back ``[offset, offset+nbytes)`` (rounded up to chunks) with fresh chunks.

        Returns the number of chunks mapped.
        """
        first, last = self._chunk_range(offset, nbytes, aligned=True)
        with self._lock:
            self._check_open()
            self._require_unmapped(first, last)
            chunks = self.pool.acquire(last - first)
            self._install(first, chunks)
            return last - first

    def map_chunks(self, offset: int, chunks: Sequence[PhysicalChunk]) -> None:
        """Map existing in-use ``chunks`` at ``offset``, sharing them (zero copy)."""
        first, last = self._chunk_range(offset, len(chunks) * self.chunk_size, aligned=True)
        with self._lock:
            self._check_open()
            self._require_unmapped(first, last)
            self.pool.retain(chunks)
            self._install(first, list(chunks))

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
                    self._install(start, chunks[pos - length : pos])
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
        shape = tuple(int(s) for s in shape)
        strides = tuple(int(s) for s in strides) if strides is not None else _contiguous(shape)
        itemsize = dtype.itemsize
        if len(strides) != len(shape) or any(s < 0 for s in (*shape, *strides)):
            raise ValueError(f"bad shape {shape} / strides {strides}")
        if offset < 0 or offset % itemsize:
            raise OutOfRangeError(f"offset {offset} is not a multiple of {itemsize} bytes")
        elems = 0 if 0 in shape else 1 + sum((n - 1) * s for n, s in zip(shape, strides))
        if offset + elems * itemsize > self.nbytes:
            raise OutOfRangeError(
                f"view of {elems * itemsize} bytes at offset {offset} exceeds the "
                f"{self.nbytes}-byte reservation"
            )
        with self._lock:
            self._check_open()
            typed = self._typed.get(dtype)
            if typed is None:
                typed = self._backend.byte_view(self.va, self.nbytes).view(dtype)
                self._typed[dtype] = typed
        return typed.as_strided(shape, strides, offset // itemsize)

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

    def _install(self, first: int, chunks: list[PhysicalChunk]) -> None:
        """Map ``chunks`` (whose references the caller holds) from chunk ``first`` on.

        On failure the partial mappings are undone and the references dropped,
        so the caller sees no change.
        """
        cs, done = self.chunk_size, 0
        try:
            for i, chunk in enumerate(chunks):
                self._backend.map(self.va + (first + i) * cs, chunk)
                done += 1
            # One access call for the whole run: it is the dominant cost per call.
            self._backend.set_access(self.va + first * cs, len(chunks) * cs)
        except BaseException:
            if done:
                self._backend.unmap(self.va + first * cs, done * cs)
            self.pool.release(chunks)
            raise
        self._table[first : first + len(chunks)] = chunks
        self._mapped += len(chunks)

    def _uninstall(self, first: int, last: int) -> None:
        chunks = [c for c in self._table[first:last] if c is not None]
        self._backend.unmap(self.va + first * self.chunk_size, (last - first) * self.chunk_size)
        self._table[first:last] = [None] * (last - first)
        self._mapped -= len(chunks)
        self.pool.release(chunks)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("virtual tensor is closed")


def _contiguous(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(strides))
