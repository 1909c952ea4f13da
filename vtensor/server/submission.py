"""What the HTTP handlers hold of the engine's work: submissions, their items, and
the two ways a submission is refused."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

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
