"""The unmap fence (``StepExecutor._apply_kv``): an unmap waits only for the latest
step still on the GPU that touched its slot, including a step whose tokens were never
read (it drew none). Stubs stand in for the arena, the runner and the CUDA events, so
the decision is checked on the CPU; on the GPU, ``test_engine_gpu``'s async test and
``test_prefix_gpu``'s multi-turn test unmap slots right after their requests stop."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import torch

from vtensor.engine.executor import StepExecutor, StepPlan
from vtensor.engine.runner import SpanInput
from vtensor.engine.stats import StepCounters
from vtensor.kvcache.commands import MapCommand, UnmapCommand


class StepEvent:
    """A step's completion event: running until the test says it finished."""

    def __init__(self) -> None:
        self.finished = False
        self.waits = 0

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.waits += 1
        self.finished = True


def make_executor() -> tuple[StepExecutor, list[Any], list[StepEvent]]:
    applied: list[Any] = []
    arena = SimpleNamespace(
        apply=applied.extend,
        wait_ready=lambda spans: list(spans),
        geometry=SimpleNamespace(chunks_for=lambda tokens: tokens // 16 + 1),
    )
    runner = SimpleNamespace(
        device=torch.device("cpu"), execute=lambda inputs: "forward", workspace=None
    )
    ex = StepExecutor(arena, runner, None, StepCounters())  # type: ignore[arg-type]
    events: list[StepEvent] = []

    def new_event() -> StepEvent:
        events.append(StepEvent())
        return events[-1]

    ex._new_event = new_event  # as on CUDA, with events the test controls
    return ex, applied, events


def launch(ex: StepExecutor, *slots: int) -> None:
    spans = [
        SpanInput(rid=s, slot=s, start=0, ids=[1, 2], unread=False, samples=True) for s in slots
    ]
    ex.run(StepPlan(inputs=spans))
    ex.mark_launched()


def waits(events: list[StepEvent]) -> list[int]:
    return [e.waits for e in events]


def test_only_unmaps_of_slots_in_flight_wait_for_the_gpu() -> None:
    ex, applied, events = make_executor()
    running = random.sample(range(64), 5)
    idle = random.choice([s for s in range(64) if s not in running])
    launch(ex, *running)
    # An idle slot's mappings (a cached block's, say): no wait, whatever else is mapped.
    ex.run(StepPlan(kv_commands=[UnmapCommand(idle, 0, 3), MapCommand(idle, 0, 2)]))
    # Maps into a slot in flight need no wait either.
    ex.run(StepPlan(kv_commands=[MapCommand(running[0], 4, 1)]))
    assert waits(events) == [0] and ex.counters.unmap_fences == 0
    # An unmap of a slot the step in flight touched waits, in either command list.
    ex.run(StepPlan(ahead_commands=[UnmapCommand(random.choice(running), 1, 1)]))
    assert waits(events) == [1] and ex.counters.unmap_fences == 1
    assert [type(c) for c in applied] == [UnmapCommand, MapCommand, MapCommand, UnmapCommand]


def test_a_step_never_read_still_fences_its_slots() -> None:
    """Steps 1-3 are all on the GPU (steps 1 and 2 drew nothing: never waited for).
    Unmapping step 1's slot waits for step 1 (and, one stream, nothing later);
    unmapping a slot of a step seen complete waits for nothing."""
    ex, _, events = make_executor()
    launch(ex, 3)
    launch(ex, 5)
    launch(ex, 7)
    ex.run(StepPlan(kv_commands=[UnmapCommand(3, 0, 1)]))
    assert waits(events) == [1, 0, 0]
    events[1].finished = True  # step 2 completed on its own
    ex.run(StepPlan(kv_commands=[UnmapCommand(5, 0, 1)]))
    assert waits(events) == [1, 0, 0]
    ex.run(StepPlan(kv_commands=[UnmapCommand(7, 0, 1), UnmapCommand(3, 0, 1)]))
    assert waits(events) == [1, 0, 1] and ex.counters.unmap_fences == 2
