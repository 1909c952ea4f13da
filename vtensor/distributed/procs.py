"""Worker processes: started with ``torch.multiprocessing`` (``spawn``), watched.

A dead worker must fail the engine loudly, naming the rank, and never hang it.
Three signals reach rank 0, the first one wins:

* a local worker's process sentinel (a thread waits on all of them): the exit
  code or signal, at once;
* a remote worker's *death notice*: its node's launcher watches it the same way
  and posts ``vtensor/dead/<rank>`` in the store, which rank 0's thread polls;
* a collective that fails (gloo sees the closed connection at once) or times
  out (the group's timeout).

A worker that raises posts its error under ``vtensor/error/<rank>`` first, so
the report says why it died, not only that it did.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Any, cast

import torch.distributed as dist
import torch.multiprocessing as tmp

log = logging.getLogger("vtensor.distributed")
DEAD = "vtensor/dead/{}"
ERROR = "vtensor/error/{}"
POLL_S = 0.5  # how often remote death notices are polled


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank is gone: the engine cannot run another step."""

    def __init__(self, rank: int, detail: str) -> None:
        super().__init__(f"tensor-parallel worker rank {rank} {detail}")
        self.rank = rank


@dataclass(frozen=True)
class LocalWorker:
    rank: int
    process: BaseProcess


def spawn_workers(
    target: Callable[..., None], ranks: Sequence[int], args: tuple[Any, ...]
) -> list[LocalWorker]:
    """Start ``target(*args, rank)`` for each rank in a fresh ``spawn`` process.

    Not daemonic: a daemon may not start children, and torch.compile's workers are
    children. The caller stops them (``stop_workers``) and registers that at exit.
    """
    ctx = tmp.get_context("spawn")
    workers = []
    for rank in ranks:
        proc = ctx.Process(target=target, args=(*args, rank), name=f"vtensor-tp-rank{rank}")
        proc.start()
        workers.append(LocalWorker(rank, proc))
    return workers


def stop_workers(workers: Sequence[LocalWorker], grace_s: float) -> None:
    """Wait ``grace_s`` for workers to exit, then terminate, then kill what is left."""
    for w in workers:
        w.process.join(grace_s)
    for w in workers:
        if w.process.is_alive():
            w.process.terminate()
            w.process.join(5.0)
        if w.process.is_alive():
            w.process.kill()
            w.process.join(5.0)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def post_error(store: dist.Store | None, rank: int, exc: BaseException, dead: bool = False) -> None:
    """A worker's last words, for rank 0's report (best effort); ``dead``: also its death
    notice (a node's launcher failing in its own rank, which no one else watches)."""
    if store is None:
        return
    text = f"{type(exc).__name__}: {exc}"[:2000]
    with contextlib.suppress(Exception):  # the store may be gone with rank 0: no one to tell
        store.set(ERROR.format(rank), text)
        if dead:
            store.set(DEAD.format(rank), "failed")


class WorkerMonitor:
    """Watches workers on a thread; records the first death as :attr:`error`.

    ``local``: the processes this process started. ``remote``: ranks whose death
    notices to poll in ``store`` (other nodes'). ``on_death`` runs on the thread
    (rank 0 aborts its NCCL group there, so GPU waits on a dead peer return).
    ``post_deaths``: a non-zero node's launcher posts its own workers' deaths.
    """

    def __init__(
        self,
        local: Sequence[LocalWorker],
        store: dist.Store | None = None,
        remote: Sequence[int] = (),
        on_death: Callable[[WorkerDiedError], None] | None = None,
        post_deaths: bool = False,
    ) -> None:
        self.local = list(local)
        self._store, self._remote = store, list(remote)
        self._on_death, self._post = on_death, post_deaths
        self.error: WorkerDiedError | None = None
        self._found = threading.Event()
        self._stopping = False
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, name="vtensor-tp-monitor", daemon=True)
        self._thread.start()

    def raise_if_dead(self) -> None:
        if self.error is not None:
            raise self.error

    def wait_for_death(self, timeout_s: float) -> WorkerDiedError | None:
        """After a collective failed: the death that explains it, if one shows in time."""
        self._found.wait(timeout_s)
        return self.error

    def stop(self) -> None:
        """Stop watching (an orderly shutdown: workers exit on purpose from now on)."""
        if self._stopping:
            return
        self._stopping = True
        os.write(self._stop_w, b"x")
        self._thread.join(5.0)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _watch(self) -> None:
        alive = {w.process.sentinel: w for w in self.local}
        timeout = POLL_S if self._remote else None
        while not self._stopping:
            ready = multiprocessing.connection.wait([*alive, self._stop_r], timeout)
            if self._stopping:
                return
            for sentinel in ready:
                w = alive.pop(cast(int, sentinel))
                w.process.join(1.0)
                if w.process.exitcode != 0:  # 0: it was told to shut down
                    self._record(w.rank, describe_exit(w.process.exitcode))
            for rank in self._remote_deaths():
                self._record(rank, self._notice(rank))

    def _remote_deaths(self) -> list[int]:
        if self._store is None or self.error is not None:
            return []
        return [r for r in self._remote if self._store.check([DEAD.format(r)])]

    def _notice(self, rank: int) -> str:
        assert self._store is not None
        return self._store.get(DEAD.format(rank)).decode()

    def _record(self, rank: int, detail: str) -> None:
        reason = self._last_error(rank)
        if reason:
            detail += f" after {reason}"
        if self._post and self._store is not None:
            # (rank 0's store may be gone: then its own collectives failed already)
            with contextlib.suppress(Exception):
                self._store.set(DEAD.format(rank), detail)
        if self.error is not None:
            return
        self.error = WorkerDiedError(rank, detail)
        log.error("%s", self.error)
        self._found.set()
        if self._on_death is not None:
            self._on_death(self.error)

    def _last_error(self, rank: int) -> str:
        if self._store is None:
            return ""
        try:
            if self._store.check([ERROR.format(rank)]):
                return self._store.get(ERROR.format(rank)).decode()
        except Exception:
            pass
        return ""
