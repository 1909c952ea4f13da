"""AsyncEngine: the engine in its own thread, fed and read through queues.

The HTTP side lives on an asyncio loop; the engine is synchronous and owns the
GPU. One thread runs the engine: between steps it takes new submissions,
aborts and calls from a thread-safe inbox; after each step it hands every
request's outputs to that request's ``asyncio.Queue`` in one
``call_soon_threadsafe`` (one wake-up of the loop per step, not per token; the
open requests' books are its :class:`Tracks`, ``tracks.py``).

Invariants:
- only the engine thread touches the ``LLMEngine`` (CUDA state, scheduler);
- every submitted request ends with exactly one item whose ``finished`` is
  true (stop, length, or abort), unless the client aborted it first;
- a finished request is popped from the engine at once, so it holds no KV.

Shutdown has two speeds. ``drain`` (the first SIGINT/SIGTERM) refuses new requests
and gives running ones until a deadline, set once, then aborts them: their streams
end with ``finish_reason: "abort"``. ``force_stop`` (a second Ctrl-C) ends every open
submission at once with an error, from the event loop, so it works even while the
engine thread is stuck in a step; the thread stops after the step it is in.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from vtensor.engine.llm_engine import LLMEngine
from vtensor.engine.params import SamplingParams

from .drain import Drain
from .metrics import ServerMetrics
from .submission import (
    EngineDeadError,
    Item,
    OpenSubmissions,
    QueueFullError,
    Submission,
    settle,
)
from .tracks import Tracks

log = logging.getLogger("vtensor.server")
IDLE_POLL_S = 0.5  # an idle engine thread wakes this often (sooner for an idle deadline)
CALL_POLL_S = 1.0  # how often a caller waiting on the engine checks that it still runs
STOP_POLL_S = 0.02  # how often stop() checks that the engine thread has ended
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int, metrics: ServerMetrics) -> None:
        if max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        self.engine = engine
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._tracks = Tracks(engine, metrics, self._loop_call)  # engine thread only
        self._pending = 0  # submissions in the inbox, not yet added to the engine
        self._waiting = 0  # the scheduler's waiting queue, published after each step
        self._error: BaseException | None = None
        self._drain = Drain()
        self.open = OpenSubmissions()  # loop side: what a forced exit ends
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- control
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="vtensor-engine", daemon=True)
        self._thread.start()

    async def stop(self, timeout_s: float | None = None) -> bool:
        """Abort what is left (each gets a finished ``abort`` item), then close the engine.
        Waits up to ``timeout_s`` (None: as long as it takes) for the engine thread, by
        polling, so that giving up leaves no thread behind blocked on a join; returns
        whether the thread ended."""
        self._stop.set()
        self._wake.set()
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while self._thread_running():
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(STOP_POLL_S)
        return True

    def drain(self, timeout_s: float, why: str = "shutdown") -> float:
        """A graceful shutdown began: refuse new requests, give running ones ``timeout_s``,
        then abort the rest so their streams end properly (finish_reason "abort"). The
        first call sets the deadline (``drain.Drain``); returns it. Any thread."""
        deadline = self._drain.begin(timeout_s, why, len(self._tracks))
        self._wake.set()
        return deadline

    def force_stop(self, reason: str) -> None:
        """End every open submission now with an error (streams: an error event and
        ``[DONE]``; others: a 503), and stop the engine thread after its current step.
        Safe from any thread, a signal handler included: the work runs on the loop."""
        self._stop.set()
        self._wake.set()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._fail_open, reason)

    def _fail_open(self, reason: str) -> None:
        ended = self.open.fail_all(EngineDeadError(reason))
        log.warning("forced exit: ended %d open requests with an error", ended)

    @property
    def draining(self) -> bool:
        return self._drain.deadline is not None

    @property
    def drain_deadline(self) -> float | None:
        return self._drain.deadline

    @property
    def alive(self) -> bool:
        return self._thread_running() and not self._stop.is_set()

    @property
    def num_waiting(self) -> int:
        return self._waiting + self._pending

    # ------------------------------------------------------------ the HTTP side
    async def submit(self, prompts: Sequence[list[int]], params: SamplingParams) -> Submission:
        """Add each prompt's ``params.n`` samples, all or none; item ``p * n + j`` of the
        submission is sample ``j`` of prompt ``p``.

        Raises ``QueueFullError`` over the queue limit, ``EngineDeadError`` when the
        engine is gone, and ``RequestError`` (a ``ValueError``) when the engine's
        request contract refuses a prompt.
        """
        if not self.alive or self.draining:
            raise EngineDeadError("the engine is not running (or is shutting down)")
        count = len(prompts) * params.n
        if self.num_waiting + count > self.max_waiting:
            raise QueueFullError(
                f"{self.num_waiting} requests are waiting (limit {self.max_waiting}); retry later"
            )
        queue: asyncio.Queue[Item | BaseException] = asyncio.Queue()
        now = time.perf_counter()

        def add() -> Submission:
            groups = self.engine.add_requests(prompts, params, stream_text=True)  # all or none
            rids = [rid for group in groups for rid in group]
            self._tracks.add(rids, queue, now)
            return Submission(rids, queue)

        self._pending += count
        try:
            sub = await self.call(add)
        finally:
            self._pending -= count
        self.open.add(sub)  # until the handler forgets it
        return sub

    def abort(self, submission: Submission) -> None:
        """Abort a submission's unfinished requests (the client went away)."""
        rids = list(submission.rids)

        def drop() -> None:
            for rid in rids:
                self._tracks.abort_now(rid)

        self._post(drop)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps and return its result."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                self._loop_call(settle, future, None, exc)
            else:
                self._loop_call(settle, future, result, None)

        self._post(run)
        # The engine answers between steps. Bounded, because a call posted just as the
        # thread ends (shutdown, or a failed step) is never run.
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), CALL_POLL_S)
            except TimeoutError:
                if not self._thread_running():
                    raise EngineDeadError("the engine stopped before answering") from None

    def _thread_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def call_blocking(self, fn: Callable[[], T], timeout: float = 60.0) -> T:
        """``call`` from a thread other than the event loop's (tests, embedding code)."""
        assert self._loop is not None, "start() the engine first"
        return asyncio.run_coroutine_threadsafe(self.call(fn), self._loop).result(timeout)

    # ---------------------------------------------------------- the engine side
    def _post(self, fn: Callable[[], None]) -> None:
        self._inbox.append(fn)
        self._wake.set()

    def _loop_call(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_inbox()
                self._abort_if_drained()
                if self.engine.has_unfinished():
                    self._tracks.deliver(self.engine.step())
                    self._waiting = len(self.engine.scheduler.waiting)
                else:
                    self._waiting = 0
                    self.engine.reclaim_idle()  # idle slots' time runs out while idle too
                    due = self.engine.next_reclaim_in()
                    self._wake.wait(timeout=IDLE_POLL_S if due is None else min(IDLE_POLL_S, due))
                    self._wake.clear()
        except BaseException as exc:  # a failed step: fail every request, stop serving
            log.exception("engine step failed; the server stops serving")
            self._error = exc
        finally:
            self._shutdown()

    def _abort_if_drained(self) -> None:
        if not self._drain.due():
            return
        if self._tracks:
            log.info("the drain deadline passed: aborting %d request(s)", len(self._tracks))
        self._tracks.abort_all(self._error)

    def _run_inbox(self) -> None:
        while self._inbox:
            self._inbox.popleft()()

    def _shutdown(self) -> None:
        """Runs on the engine thread: end every open request, then release the engine."""
        self._run_inbox_safely()
        self._tracks.abort_all(self._error)
        self.engine.close()

    def _run_inbox_safely(self) -> None:
        # Calls posted after the loop ended still resolve (their futures must not hang).
        try:
            self._run_inbox()
        except BaseException:
            log.exception("engine call failed during shutdown")
