"""AsyncMapper: map and unmap chunks on a background thread.

Driver-side mapping is slow (~26 µs per chunk for ``cuMemSetAccess`` on the
H100) but does not wait for running kernels, so it can overlap the forward
pass. The engine submits a batch of operations, keeps computing, and calls
:meth:`MapTicket.wait` only when it needs the range; the time spent blocked
there is accounted, because it is the only mapping cost the engine sees.

Contract:

* Batches run in submission order (FIFO) on one worker thread; the ops of a
  batch run in order. Each op is atomic (see ``VirtualTensor``).
* A batch stops at its first failing op. The ops before it stay applied; the
  ticket re-raises the error, wrapped with the failing op's index, in ``wait``.
* ``close`` finishes every batch already submitted, then joins the thread: no
  thread is left behind and, once the caller closes its tensors, no chunk.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from .backend import PhysicalBackend, PhysicalChunk
from .errors import ClosedError, MapperError
from .pool import ChunkPool
from .virtual import VirtualTensor


class MapperOp(ABC):
    """One unit of background work. ``apply`` runs on the mapper thread."""

    @abstractmethod
    def apply(self) -> int:
        """Do the work; return the number of chunks it touched (for stats)."""


@dataclass(frozen=True)
class EnsureMapped(MapperOp):
    """Map fresh chunks into the holes of a range (growth; idempotent)."""

    vt: VirtualTensor
    offset: int
    nbytes: int

    def apply(self) -> int:
        return self.vt.ensure_mapped(self.offset, self.nbytes)


@dataclass(frozen=True)
class Map(MapperOp):
    """Map fresh chunks over a range that must be entirely unmapped."""

    vt: VirtualTensor
    offset: int
    nbytes: int

    def apply(self) -> int:
        return self.vt.map(self.offset, self.nbytes)


@dataclass(frozen=True)
class MapShared(MapperOp):
    """Map chunks that are already in use elsewhere (prefix sharing)."""

    vt: VirtualTensor
    offset: int
    chunks: tuple[PhysicalChunk, ...]

    def apply(self) -> int:
        self.vt.map_chunks(self.offset, self.chunks)
        return len(self.chunks)


@dataclass(frozen=True)
class Unmap(MapperOp):
    vt: VirtualTensor
    offset: int
    nbytes: int

    def apply(self) -> int:
        return self.vt.unmap(self.offset, self.nbytes)


@dataclass(frozen=True)
class Warm(MapperOp):
    """Create chunks ahead of need until ``n_free`` are free."""

    pool: ChunkPool
    n_free: int

    def apply(self) -> int:
        return self.pool.warm(self.n_free)


@dataclass(frozen=True)
class Trim(MapperOp):
    """Release free chunks to the driver, keeping ``keep_free``."""

    pool: ChunkPool
    keep_free: int = 0

    def apply(self) -> int:
        return self.pool.trim(self.keep_free)


class MapTicket:
    """Handle on a submitted batch. ``wait`` blocks until it is done."""

    def __init__(self, mapper: AsyncMapper, ops: tuple[MapperOp, ...]) -> None:
        self.ops = ops
        self._mapper = mapper
        self._event = threading.Event()
        self._error: BaseException | None = None
        self.chunks = 0

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the batch ran; re-raise its error here, in the caller."""
        if not self._event.is_set():
            t0 = time.perf_counter()
            finished = self._event.wait(timeout)
            self._mapper._add_wait(time.perf_counter() - t0)
            if not finished:
                raise TimeoutError(f"mapper batch of {len(self.ops)} ops not done in {timeout}s")
        if self._error is not None:
            raise self._error

    def _finish(self, chunks: int, error: BaseException | None) -> None:
        self.chunks, self._error = chunks, error
        self._event.set()


@dataclass(frozen=True, slots=True)
class MapperStats:
    batches: int
    ops: int
    chunks: int
    busy_s: float  # time the worker spent doing ops
    wait_s: float  # time callers spent blocked in MapTicket.wait
    pending: int


_STOP = object()


class AsyncMapper:
    """A single background thread that applies :class:`MapperOp` batches."""

    def __init__(self, backend: PhysicalBackend, name: str = "vtensor-mapper") -> None:
        self._backend = backend
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._batches = self._ops = self._chunks = 0
        self._busy_s = self._wait_s = 0.0
        self._pending = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, ops: Sequence[MapperOp]) -> MapTicket:
        """Queue a batch; returns at once with a ticket to wait on."""
        with self._lock:
            if self._closed:
                raise MapperError("mapper is closed")
            ticket = MapTicket(self, tuple(ops))
            self._pending += 1
            self._queue.put(ticket)
        return ticket

    def run(self, ops: Sequence[MapperOp]) -> None:
        """Submit and wait: the synchronous path, still on the mapper thread."""
        self.submit(ops).wait()

    def stats(self) -> MapperStats:
        with self._lock:
            return MapperStats(
                self._batches, self._ops, self._chunks, self._busy_s, self._wait_s, self._pending
            )

    def close(self) -> None:
        """Finish every submitted batch, then stop and join the worker."""
        with self._lock:
            if self._closed:
                raise ClosedError("mapper already closed")
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> AsyncMapper:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.close()

    # ---------------------------------------------------------------- worker
    def _add_wait(self, seconds: float) -> None:
        with self._lock:
            self._wait_s += seconds

    def _run(self) -> None:
        bind_error: BaseException | None = None
        try:
            self._backend.bind_thread()
        except BaseException as exc:  # reported to every ticket below
            bind_error = exc
        while (item := self._queue.get()) is not _STOP:
            assert isinstance(item, MapTicket)
            self._execute(item, bind_error)

    def _execute(self, ticket: MapTicket, bind_error: BaseException | None) -> None:
        t0 = time.perf_counter()
        chunks, done = 0, 0
        error: Exception | None = None
        if bind_error is not None:
            error = MapperError(f"mapper thread could not bind to the device: {bind_error}")
        else:
            for i, op in enumerate(ticket.ops):
                try:
                    chunks += op.apply()
                    done += 1
                except Exception as exc:
                    error = exc
                    exc.add_note(f"in mapper op {i} of {len(ticket.ops)}: {op!r}")
                    break
        with self._lock:
            self._batches += 1
            self._ops += done
            self._chunks += chunks
            self._busy_s += time.perf_counter() - t0
            self._pending -= 1
        ticket._finish(chunks, error)
