"""Spill's copy-out without a host wait (``engine/spill.py``: ``UnmapAfterCopy``), on
the CPU engine with a stand-in copy event that completes late: the host (the step's
thread) returns from queueing the copy before it completes (which takes ``LATE_S``
from the moment the mapper waits for it: far longer than queueing); the mapper thread waits for it;
until it completes, each spilled chunk stays out of the pool (the staging range's
mapping holds a reference); the outputs stay those of the engine with the cache off
and the books balance (the fixture's checks), the staging range empty after each
step's commands."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.test_spill_engine import CHUNK, POOL, conversations, traffic

LATE_S = 0.05  # the stand-in copy completes this long after the mapper starts waiting


class LateEvent:
    """A copy's completion event: ``synchronize`` (on the mapper thread) checks that
    the spilled chunks are still out of the pool, waits ``LATE_S``, checks again."""

    def __init__(self, copier: Any, spans: list[tuple[int, int]], seen: dict[str, Any]) -> None:
        self.pool, self.stage, self.spans, self.seen = copier.arena.pool, copier.stage, spans, seen
        self.chunks = self.mapped()
        self.returned = threading.Event()  # the host returned from queueing the copy
        self.complete = False

    def query(self) -> bool:
        return self.complete

    def synchronize(self) -> None:
        self.seen["threads"].add(threading.current_thread().name)
        self.check()
        threading.Event().wait(LATE_S)
        self.seen["host_went_on"] += self.returned.is_set()
        self.check()
        self.complete = True

    def mapped(self) -> list[Any]:
        """The chunks the staging ring maps where the copy reads them."""
        return [c for at, n in self.spans for c in self.stage.chunks(at, n)]

    def check(self) -> None:
        """The copy's source is still mapped (not unmapped under it), and its chunks
        are out of the pool."""
        if self.mapped() != self.chunks or not all(map(self.pool.refcount, self.chunks)):
            self.seen["early"] += 1


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_copy_out_completes_late_and_its_chunks_return_after(
    make_llm: Any, async_scheduling: bool
) -> None:
    waves = traffic()
    common = dict(POOL, async_scheduling=async_scheduling, debug_check_every=1)
    want = conversations(make_llm(**common, enable_prefix_caching=False), waves)
    llm = make_llm(**common, swap_space_bytes=64 * CHUNK)
    copier = llm.engine.spill
    seen: dict[str, Any] = {"threads": set(), "host_went_on": 0, "early": 0}
    events: list[LateEvent] = []
    queue = copier.swapper.copy_out_queued

    def late_copy(ranges: Any, spill: bool = False, after: Any = None) -> LateEvent:
        assert spill and queue(ranges, spill=spill, after=after) is None  # CPU: copied
        spans = [(at, len(slots) * CHUNK) for _, at, slots in ranges]
        events.append(LateEvent(copier, spans, seen))
        return events[-1]

    copier.swapper.copy_out_queued = late_copy
    copy_batch = copier._copy_batch

    def copy_batch_then_mark(batch: Any) -> None:
        copy_batch(batch)
        for e in events:  # the copy is queued and the host goes on
            e.returned.set()

    copier._copy_batch = copy_batch_then_mark
    assert conversations(llm, waves) == want
    llm.engine.arena.wait_all()
    assert events and all(e.complete for e in events)
    assert seen["early"] == 0
    assert threading.main_thread().name not in seen["threads"]  # the mapper waited
    assert copier.stage.mapped_chunks == 0
    s = llm.engine.stats()
    assert s.prefix_cache_spilled_blocks > 0 and s.prefix_cache_host_hits > 0
    assert seen["host_went_on"] == len(events)  # each waited LATE_S, the host none of it
