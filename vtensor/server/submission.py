"""What the HTTP handlers hold of the engine's work: submissions, their items, the
two ways a submission is refused, and the loop-side callbacks that hand items over
(the engine thread schedules them with ``call_soon_threadsafe``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from vtensor.engine.outputs import StepOutput


class QueueFullError(RuntimeError):
    """The waiting queue is at its limit: the caller should answer 503."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down, or a step raised)."""


@dataclass(frozen=True)
class Item:
    """One choice's progress, as the handlers see it."""

    index: int  # the choice index within its HTTP request
    out: StepOutput


@dataclass
class Submission:
    """An HTTP request's engine requests; their items arrive on ``queue``."""

    rids: list[int]
    queue: asyncio.Queue[Item | BaseException]


Inbox = asyncio.Queue[Item | BaseException]


@dataclass
class Track:
    """Per engine request (engine thread): where its items go, its timing for metrics."""

    queue: Inbox
    index: int
    arrival: float
    first: float | None = None
    tokens: int = 0


class OpenSubmissions:
    """The handlers' submissions still open (event-loop side only): what a forced exit
    ends at once, whatever the engine thread is doing."""

    def __init__(self) -> None:
        self._subs: dict[int, Submission] = {}
        self.forced: int | None = None  # how many a forced exit ended; None: not forced

    def add(self, sub: Submission) -> None:
        self._subs[id(sub)] = sub

    def forget(self, sub: Submission) -> None:
        """The handler is done with ``sub`` (it ended, or its client left)."""
        self._subs.pop(id(sub), None)

    def fail_all(self, error: BaseException) -> int:
        self.forced = len(self._subs)
        for sub in self._subs.values():
            sub.queue.put_nowait(error)
        return self.forced


def settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def dispatch(deliveries: list[tuple[Inbox, list[Item]]]) -> None:
    for queue, items in deliveries:
        put_all(queue, items)


def put_all(queue: Inbox, items: list[Any]) -> None:
    for item in items:
        queue.put_nowait(item)
