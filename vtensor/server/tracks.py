"""The engine thread's books of open requests: each one's queue, times and tokens.

``AsyncEngine`` owns one :class:`Tracks`. After each step it hands the step's outputs
to each request's ``asyncio.Queue`` in one call on the event loop (one wake-up per
step, not per token), records the server metrics, and pops a finished request from
the engine at once, so that it holds no KV.

Invariant: only the engine thread touches a ``Tracks`` (and the ``LLMEngine``); the
queues are reached through ``loop_call``, which runs a function on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from vtensor.engine.outputs import StepOutput

from .metrics import ServerMetrics
from .submission import EngineDeadError, Item, Track, dispatch, put_all

if TYPE_CHECKING:
    from vtensor.engine.llm_engine import LLMEngine

LoopCall = Callable[..., None]  # loop_call(fn, *args): fn(*args) on the event loop


class Tracks:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, loop_call: LoopCall) -> None:
        self.engine = engine
        self.metrics = metrics
        self.loop_call = loop_call
        self.by_rid: dict[int, Track] = {}

    def __len__(self) -> int:
        return len(self.by_rid)

    def add(self, rids: list[int], queue: asyncio.Queue[Item | BaseException], now: float) -> None:
        """Track a submission's requests; item ``i`` of the queue's stream is ``rids[i]``."""
        for i, rid in enumerate(rids):
            self.by_rid[rid] = Track(queue, i, now)
        self.metrics.observe_submitted(len(rids))

    def deliver(self, outs: list[StepOutput]) -> None:
        now = time.perf_counter()
        batches: dict[asyncio.Queue[Item | BaseException], list[Item]] = {}
        for out in outs:
            track = self.by_rid.get(out.rid)
            if track is None:  # aborted by its client during this step
                continue
            if track.first is None:
                track.first = now
                self.metrics.observe_first_token(now - track.arrival)
            track.tokens += len(out.new_token_ids)
            batches.setdefault(track.queue, []).append(Item(track.index, out))
            if out.finished:
                self._finish(out.rid, track, now, out.finish_reason or "abort")
        self.metrics.add_tokens(sum(len(o.new_token_ids) for o in outs), now)
        if batches:  # one wake-up of the event loop per step, however many requests
            self.loop_call(dispatch, list(batches.items()))

    def _finish(self, rid: int, track: Track, now: float, reason: str) -> None:
        req = self.engine.pop(rid)
        del self.by_rid[rid]
        self.metrics.observe_finished(
            reason, now - track.arrival, track.first, now, track.tokens, req.num_prompt
        )

    def abort_now(self, rid: int) -> None:
        self.by_rid.pop(rid, None)
        if rid in self.engine.requests:
            self.engine.abort(rid)
            self.engine.pop(rid)
            self.metrics.observe_aborted()

    def abort_all(self, error: BaseException | None) -> None:
        """End every open request: an ``abort`` item, or (``error``: the step failed) an
        ``EngineDeadError``, for each."""
        for rid, track in list(self.by_rid.items()):
            if error is not None:
                # The step's exception is in the log; clients get no internals.
                dead = EngineDeadError("the engine stopped after an internal error")
                self.loop_call(put_all, track.queue, [dead])
            else:
                out = StepOutput(rid, [], "", True, "abort")
                self.loop_call(put_all, track.queue, [Item(track.index, out)])
            self.abort_now(rid)
