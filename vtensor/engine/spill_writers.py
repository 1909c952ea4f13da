"""BlockWriters: which steps in flight may still write a cached block's KV.

A spilled block's copy-out must not read its chunks before the steps that computed
them finished writing. Waiting for every step queued so far (the compute stream's
position) is correct but, under async scheduling, orders the copy after the step
still on the GPU, and the host, which waits for the copy, with it: the evicting
step then runs synchronously. A cached block is full and immutable once the
steps that computed it are done, and the cache adopts a block
(``CacheHoldCommand``) only for tokens computed or queued by launched steps, so:

* after each step whose commands held chunks, an event is recorded on the compute
  stream (after that step's own work: conservative by one step) and marks them;
* a copy-out waits (on the GPU, no host block) only for the marks of its chunks
  that are not complete yet; a block the cache dropped long ago has none, and its
  copy starts at once, beside the step in flight;
* a chunk held by the step being applied has no mark yet: its copy waits for the
  whole compute stream (``after`` returns None), as before.

Marks are kept in launch order and dropped once complete (polled each launch), so
only the chunks held by the steps still in flight are tracked. Without CUDA (no
event factory) nothing is tracked and the copies, synchronous, wait for nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from vtensor.kvcache.commands import CacheHoldCommand, KVCommand


class BlockWriters:
    def __init__(self, new_event: Callable[[], Any] | None) -> None:
        """``new_event``: a CUDA event factory (tests pass a fake with ``record`` and
        ``query``); None: no CUDA, nothing tracked."""
        self.new_event = new_event
        self._step: set[int] = set()  # chunk ids held by the step being applied
        self._marks: deque[tuple[Any, tuple[int, ...]]] = deque()  # oldest first
        self._mark_of: dict[int, Any] = {}  # chunk id -> its (latest) mark

    def observe(self, commands: Iterable[KVCommand]) -> None:
        """Note the chunks the step's commands hold (before they are applied)."""
        if self.new_event is None:
            return
        for c in commands:
            if isinstance(c, CacheHoldCommand):
                self._step.update(c.chunks)

    def after(self, chunks: Iterable[int]) -> Sequence[Any] | None:
        """The events a copy-out of ``chunks`` must wait for: the incomplete marks of
        the steps that held them; None: one was held this very step (wait for every
        step queued so far)."""
        if self.new_event is None:
            return None
        events: dict[int, Any] = {}
        for cid in chunks:
            if cid in self._step:
                return None
            mark = self._mark_of.get(cid)
            if mark is not None and not mark.query():
                events[id(mark)] = mark
        return list(events.values())

    def mark_launched(self) -> None:
        """The step's work is queued: mark the chunks it held with an event recorded
        after it, and forget the marks that completed."""
        self._prune()
        if not self._step:
            return
        assert self.new_event is not None
        mark = self.new_event()
        mark.record()
        ids = tuple(self._step)
        self._marks.append((mark, ids))
        self._mark_of.update(dict.fromkeys(ids, mark))
        self._step = set()

    @property
    def tracked(self) -> int:
        """Chunks whose writers may still be in flight (tests, integrity)."""
        return len(self._mark_of)

    def _prune(self) -> None:
        while self._marks and self._marks[0][0].query():
            mark, ids = self._marks.popleft()
            for cid in ids:
                if self._mark_of.get(cid) is mark:
                    del self._mark_of[cid]
