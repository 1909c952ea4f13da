"""Copy queues: the copy side of the prefetcher, on a CUDA stream or a CPU thread.

Both run the same protocol. There are two queues of work: *compute* (the
caller's: the current CUDA stream, or the calling thread on the CPU) and
*copy*. The prefetcher says when compute is done with a ring slot
(``release``), queues a copy into a slot (``fill``), makes compute wait for a
copy (``acquire``), and for all of them (``join``).

On CUDA the copies are ``cudaMemcpyAsync`` from pinned memory on a dedicated
stream, ordered by events, so the host never waits and a CUDA graph can
capture the lot: each event's record and wait become graph edges. On the CPU
a worker thread runs the copies in order and ``threading.Event`` objects play
the events: compute (the calling thread) really blocks until its weights have
arrived, which is what the CPU tests of the ordering rely on.
"""

from __future__ import annotations

import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

CopyFn = Callable[[torch.Tensor, torch.Tensor], None]


class OffloadCopyError(RuntimeError):
    """A weight copy failed on the copy queue."""


def default_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)


class CopyQueue(ABC):
    """Contract:

    * ``release(slot)``: compute is done with ``slot`` as of now; the next
      ``fill`` of that slot starts after it.
    * ``fill(slot, dst, src, tag)``: copy ``src`` (host bytes) into ``dst`` (the
      slot's bytes) after the slot's latest ``release`` and after every earlier
      fill; ``tag`` names its completion. A fill must follow a ``release`` of its
      slot made in the same forward pass (graph capture needs every waited event
      recorded inside the capture).
    * ``acquire(tag)``: compute waits for the fill ``tag`` (and nothing more).
    * ``join()``: compute waits for every fill queued so far.

    ``copy_fn(dst, src)`` does the copy (tests slow it down); it runs on the copy
    stream (CUDA) or the copy thread (CPU).
    """

    def __init__(self, copy_fn: CopyFn | None = None) -> None:
        self.copy_fn: CopyFn = copy_fn or default_copy
        self.fills = 0  # over the queue's life

    @abstractmethod
    def release(self, slot: int) -> None: ...

    @abstractmethod
    def fill(self, slot: int, dst: torch.Tensor, src: torch.Tensor, tag: int) -> None: ...

    @abstractmethod
    def acquire(self, tag: int) -> None: ...

    @abstractmethod
    def join(self) -> None: ...

    def capturing(self) -> bool:
        """Whether compute is being captured into a CUDA graph right now."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Finish queued copies and free the queue's resources."""


class CudaCopyQueue(CopyQueue):
    def __init__(self, device: torch.device, depth: int, copy_fn: CopyFn | None = None) -> None:
        super().__init__(copy_fn)
        self.stream = torch.cuda.Stream(device=device)
        self._free = [torch.cuda.Event() for _ in range(depth)]
        self._ready: dict[int, torch.cuda.Event] = {}
        self._pending = False  # a fill queued since the last join
        # Benchmarks set a list: each eager fill's (start, end, bytes), timed on the stream.
        self.trace: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] | None = None

    def release(self, slot: int) -> None:
        self._free[slot].record(torch.cuda.current_stream())

    def fill(self, slot: int, dst: torch.Tensor, src: torch.Tensor, tag: int) -> None:
        self.stream.wait_event(self._free[slot])
        timed = self.trace is not None and not self.capturing()
        if timed:  # recorded after the wait: the copy's own start
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
        with torch.cuda.stream(self.stream):
            self.copy_fn(dst, src)
        if timed and self.trace is not None:
            end.record(self.stream)
            self.trace.append((start, end, src.numel() * src.element_size()))
        self._ready.setdefault(tag, torch.cuda.Event()).record(self.stream)
        self._pending = True
        self.fills += 1

    def acquire(self, tag: int) -> None:
        torch.cuda.current_stream().wait_event(self._ready[tag])

    def join(self) -> None:
        # Only after a fill: waiting on a stream that took no part in a capture would
        # wait on work recorded outside it, which capture forbids.
        if self._pending:
            torch.cuda.current_stream().wait_stream(self.stream)
            self._pending = False

    def capturing(self) -> bool:
        return torch.cuda.is_current_stream_capturing()

    def close(self) -> None:
        self.stream.synchronize()


class ThreadCopyQueue(CopyQueue):
    """The CPU's copy queue: one worker thread, copies in FIFO order."""

    def __init__(self, copy_fn: CopyFn | None = None) -> None:
        super().__init__(copy_fn)
        self._jobs: queue.Queue[tuple[torch.Tensor, torch.Tensor, threading.Event] | None]
        self._jobs = queue.Queue()
        self._ready: dict[int, threading.Event] = {}
        self._last: threading.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vtensor-offload-copy", daemon=True)
        self._thread.start()

    def release(self, slot: int) -> None:
        """Nothing to record: CPU compute is synchronous, so the slot's reads are over."""

    def fill(self, slot: int, dst: torch.Tensor, src: torch.Tensor, tag: int) -> None:
        if not self._thread.is_alive():
            raise OffloadCopyError("the copy thread is closed")
        done = threading.Event()
        self._ready[tag] = self._last = done
        self._jobs.put((dst, src, done))
        self.fills += 1

    def acquire(self, tag: int) -> None:
        self._wait(self._ready[tag])

    def join(self) -> None:
        if self._last is not None:  # FIFO: the last fill done means all are
            self._wait(self._last)

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def _wait(self, done: threading.Event) -> None:
        done.wait()
        if self._error is not None:
            raise OffloadCopyError(f"a weight copy failed: {self._error!r}") from self._error

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            dst, src, done = job
            try:
                if self._error is None:
                    self.copy_fn(dst, src)
            except BaseException as exc:  # reported to compute, which would wait forever
                self._error = exc
            finally:
                done.set()
