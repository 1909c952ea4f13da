"""Spill's copy-out waits only for the steps that may still write its blocks
(``engine/spill_writers.py``): fake events stand in for CUDA's on the CPU. Checked
alone, and on the CPU engine against a reference model of the GPU (a step's work
completes ``lag`` steps after it was launched): every copy-out waits for exactly
the incomplete marks of its chunks' latest holds, or for everything (None) when a
chunk was held in the very step that spills it; the outputs stay those of the
engine with the cache off."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.test_spill_engine import CHUNK, POOL, conversations, traffic
from vtensor.engine.spill_writers import BlockWriters
from vtensor.kvcache.commands import CacheDropCommand, CacheHoldCommand, MapCommand


class FakeEvent:
    """A CUDA event of step ``step``: complete once ``clock[0] - step >= lag``."""

    def __init__(self, clock: list[int], step: int, lag: int) -> None:
        self.clock, self.step, self.lag = clock, step, lag
        self.recorded = False

    def record(self) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.clock[0] - self.step >= self.lag


def hold(*ids: int) -> CacheHoldCommand:
    return CacheHoldCommand(slot=1, first=0, chunks=ids)


def test_without_cuda_nothing_is_tracked() -> None:
    w = BlockWriters(None)
    w.observe([hold(1, 2)])
    w.mark_launched()
    assert w.after([1, 2]) is None and w.tracked == 0


def test_copy_waits_only_for_incomplete_marks_of_its_chunks() -> None:
    clock = [0]
    made: list[FakeEvent] = []

    def new_event() -> FakeEvent:
        made.append(FakeEvent(clock, clock[0], lag=2))
        return made[-1]

    w = BlockWriters(new_event)
    ids = random.sample(range(1000), 6)
    w.observe([MapCommand(1, 0, 2), hold(*ids[:3]), CacheDropCommand((999_999,))])
    assert w.after(ids[:1]) is None  # held this very step: wait for everything
    assert w.after(ids[3:]) == []  # never held while tracked: no wait
    w.mark_launched()  # step 0's mark
    assert len(made) == 1 and made[0].recorded
    clock[0] = 1
    w.observe([hold(*ids[3:])])
    assert w.after(ids[:3]) == [made[0]]  # step 0 is still in flight
    assert w.after([ids[0], ids[3]]) is None
    w.mark_launched()  # step 1's mark
    clock[0] = 2  # step 0 completed, step 1 did not
    assert w.after(ids) == [made[1]]
    w.observe([hold(ids[0])])  # held again (offered anew): the later mark counts
    w.mark_launched()  # step 2's; prunes step 0's
    assert w.tracked == 4  # ids[0] (step 2) and ids[3:] (step 1)
    clock[0] = 3
    assert w.after(ids[:3]) == [made[2]]
    w.mark_launched()  # no hold: no new event
    assert len(made) == 3 and w.tracked == 1
    clock[0] = 10
    w.mark_launched()
    assert w.tracked == 0 and w.after(ids) == []  # nothing left behind


def test_a_step_without_holds_records_no_event() -> None:
    made: list[FakeEvent] = []
    w = BlockWriters(lambda: made.append(FakeEvent([0], 0, 1)) or made[-1])
    w.observe([MapCommand(0, 0, 1)])
    w.mark_launched()
    assert made == [] and w.tracked == 0


class Reference:
    """The test's own account of which step last held each chunk, and the copies'
    waits seen by the swapper."""

    def __init__(self, copier: Any, lag: int) -> None:
        self.clock = [-1]
        self.lag = lag
        self.last_hold: dict[int, int] = {}
        self.checked = self.waited = 0
        self.copier = copier
        copier.writers.new_event = lambda: FakeEvent(self.clock, self.clock[0], lag)
        plan, copy_batch = copier.plan, copier._copy_batch
        copy_from = copier.swapper.copy_out_queued
        batch_chunks: list[int] = []

        def spy_plan(kv: list[Any], ahead: list[Any], spills: list[Any]) -> Any:
            self.clock[0] += 1
            for c in [*kv, *ahead]:
                if isinstance(c, CacheHoldCommand):
                    self.last_hold.update(dict.fromkeys(c.chunks, self.clock[0]))
            return plan(kv, ahead, spills)

        def spy_batch(batch: list[Any]) -> None:
            batch_chunks[:] = [c for s in batch for c in s.chunks]
            copy_batch(batch)

        def spy_copy(ranges: Any, spill: bool = False, after: Any = None) -> Any:
            if spill:
                self.check(batch_chunks, after)
            return copy_from(ranges, spill=spill, after=after)

        copier.plan, copier._copy_batch, copier.swapper.copy_out_queued = (
            spy_plan,
            spy_batch,
            spy_copy,
        )

    def check(self, chunks: list[int], after: Any) -> None:
        now = self.clock[0]
        steps = [self.last_hold.get(c) for c in chunks]
        self.checked += 1
        if now in steps:
            assert after is None, f"chunks {chunks} held in step {now} must wait for all"
            return
        want = {h for h in steps if h is not None and now - h < self.lag}
        assert after is not None and sorted(e.step for e in after) == sorted(want)
        self.waited += bool(after)


@pytest.mark.parametrize("lag", [1, 2, 3, 10**6], ids=lambda n: f"lag{n}")
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_engine_copy_out_waits_for_its_writers(
    make_llm: Any, lag: int, async_scheduling: bool
) -> None:
    waves = traffic()
    common = dict(POOL, async_scheduling=async_scheduling, debug_check_every=1)
    want = conversations(make_llm(**common, enable_prefix_caching=False), waves)
    llm = make_llm(**common, swap_space_bytes=64 * CHUNK)
    ref = Reference(llm.engine.spill, lag)
    assert conversations(llm, waves) == want
    s = llm.engine.stats()
    assert s.prefix_cache_spilled_blocks > 0 and s.prefix_cache_host_hits > 0
    assert ref.checked > 0
    if lag == 1:  # every earlier step is complete by the next one's copies
        assert ref.waited == 0
    if lag == 10**6:  # nothing completes: the marks of every held chunk stay
        assert ref.waited > 0
        assert llm.engine.spill.writers.tracked > 0
