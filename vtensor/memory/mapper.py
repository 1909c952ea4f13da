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
* The one exception to FIFO: a :class:`DeferredOp` alone in its batch that is not
  ``ready`` (an unmap waiting for a copy on the GPU to finish reading the range) is
  *parked*: later batches run before it, so one copy does not hold up every map
  behind it. A parked op runs once ready (polled every ``POLL_S``), or at once,
  waiting for it, when a later op finds the pool exhausted (its chunks may be the
  ones needed: the op is then retried), and before ``close`` returns. Its ticket is
  done only then; :meth:`AsyncMapper.wait_parked` waits for every parked op.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .backend import PhysicalBackend
from .errors import ClosedError, MapperError, PoolExhaustedError
from .mapper_ops import (
    DeferredOp,
    EnsureMapped,
    Map,
    MapperOp,
    MapShared,
    Trim,
    Unmap,
    Warm,
)

__all__ = [
    "AsyncMapper",
    "DeferredOp",
    "EnsureMapped",
    "Map",
    "MapShared",
    "MapTicket",
    "MapperOp",
    "MapperStats",
    "Trim",
    "Unmap",
    "Warm",
]


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
    # Ops that found the pool exhausted and waited for a parked op (its event), and the
    # time those waits took (part of busy_s).
    pool_waits: int = 0
    pool_wait_s: float = 0.0


_STOP = object()
POLL_S = 0.0005  # how often the worker checks parked ops while it has any


class AsyncMapper:
    """A single background thread that applies :class:`MapperOp` batches."""

    def __init__(self, backend: PhysicalBackend, name: str = "vtensor-mapper") -> None:
        self._backend = backend
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._batches = self._ops = self._chunks = 0
        self._busy_s = self._wait_s = 0.0
        self._pool_waits, self._pool_wait_s = 0, 0.0
        self._pending = 0
        # Parked deferred ops, oldest first (worker thread only; the lock guards the
        # snapshot that wait_parked takes).
        self._parked: collections.deque[MapTicket] = collections.deque()
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

    def wait_parked(self) -> None:
        """Wait for every op parked so far (after the batches the caller waited for:
        an op submitted before them is parked or done by then)."""
        with self._lock:
            parked = list(self._parked)
        for ticket in parked:
            ticket.wait()

    def stats(self) -> MapperStats:
        with self._lock:
            return MapperStats(
                self._batches, self._ops, self._chunks, self._busy_s, self._wait_s,
                self._pending, self._pool_waits, self._pool_wait_s,
            )  # fmt: skip

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
        while True:
            try:
                item = self._queue.get(timeout=POLL_S if self._parked else None)
            except queue.Empty:
                self._run_parked(block=False)
                continue
            if item is _STOP:
                break
            assert isinstance(item, MapTicket)
            self._run_parked(block=False)
            if bind_error is None and self._park(item):
                continue
            self._execute(item, bind_error)
        self._run_parked(block=True)

    def _park(self, ticket: MapTicket) -> bool:
        """Park ``ticket`` if it is one deferred op that is not ready yet."""
        ops = ticket.ops
        if len(ops) == 1 and isinstance(ops[0], DeferredOp) and not ops[0].ready():
            with self._lock:
                self._parked.append(ticket)
            return True
        return False

    def _run_parked(self, block: bool) -> bool:
        """Run the parked ops that are ready, oldest first (``block``: all of them,
        waiting for each). Returns whether any ran."""
        ran = False
        for ticket in list(self._parked):
            op = ticket.ops[0]
            assert isinstance(op, DeferredOp)
            if block:
                op.wait_ready()
            elif not op.ready():
                continue
            with self._lock:
                self._parked.remove(ticket)
            self._execute(ticket, None)
            ran = True
        return ran

    def _apply(self, op: MapperOp) -> int:
        """Apply ``op``; if the pool is exhausted while ops are parked, run the oldest
        (waiting for it: its chunks may be the ones needed) and try again. Pool-taking
        ops are atomic (``VirtualTensor``), so a failed attempt changed nothing."""
        while True:
            try:
                return op.apply()
            except PoolExhaustedError:
                if not self._parked:
                    raise
                oldest = self._parked[0]
                assert isinstance(oldest.ops[0], DeferredOp)
                t0 = time.perf_counter()
                oldest.ops[0].wait_ready()
                with self._lock:
                    self._pool_waits += 1
                    self._pool_wait_s += time.perf_counter() - t0
                with self._lock:
                    self._parked.popleft()
                self._execute(oldest, None)

    def _execute(self, ticket: MapTicket, bind_error: BaseException | None) -> None:
        t0 = time.perf_counter()
        chunks, done = 0, 0
        error: Exception | None = None
        if bind_error is not None:
            error = MapperError(f"mapper thread could not bind to the device: {bind_error}")
        else:
            for i, op in enumerate(ticket.ops):
                try:
                    chunks += self._apply(op)
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
