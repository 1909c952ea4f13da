"""The unmap fence (``StepExecutor._apply_kv``): an unmap waits for the step in flight
only if that step touched the slot. Stubs stand in for the arena, the runner and the
CUDA event, so the decision is checked on the CPU; the GPU side (async scheduling with
slots unmapped right after their request stops) is ``test_engine_gpu``'s."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import torch

from vtensor.engine.executor import StepExecutor, StepPlan
from vtensor.engine.runner import SpanInput
from vtensor.engine.stats import StepCounters
from vtensor.kvcache.commands import MapCommand, UnmapCommand


class InFlight:
    """A CUDA event of a step that has not finished: ``synchronize`` is the wait."""

    def __init__(self) -> None:
        self.waits = 0

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        self.waits += 1


def make_executor() -> tuple[StepExecutor, list[Any]]:
    applied: list[Any] = []
    arena = SimpleNamespace(
        apply=applied.extend,
        wait_ready=lambda spans: list(spans),
        geometry=SimpleNamespace(chunks_for=lambda tokens: tokens // 16 + 1),
    )
    runner = SimpleNamespace(device=torch.device("cpu"), execute=lambda inputs: "forward")
    return StepExecutor(arena, runner, None, StepCounters()), applied  # type: ignore[arg-type]


def span(slot: int) -> SpanInput:
    return SpanInput(rid=slot, slot=slot, start=0, ids=[1, 2], unread=False, samples=True)


def test_only_unmaps_of_slots_in_flight_wait_for_the_gpu() -> None:
    ex, applied = make_executor()
    running = random.sample(range(64), 5)
    idle = random.choice([s for s in range(64) if s not in running])
    ex.run(StepPlan(inputs=[span(s) for s in running]))
    ex.mark_launched()
    event = InFlight()
    ex._last_launch_done = event  # type: ignore[assignment]  # the step is still on the GPU

    # An idle slot's mappings (a cached block's, say): no wait, whatever else is mapped.
    ex.run(StepPlan(kv_commands=[UnmapCommand(idle, 0, 3), MapCommand(idle, 0, 2)]))
    assert event.waits == 0 and ex.counters.unmap_fences == 0
    # Maps into a slot in flight need no wait either.
    ex.run(StepPlan(kv_commands=[MapCommand(running[0], 4, 1)]))
    assert event.waits == 0
    # An unmap of a slot the step in flight touched waits, in either command list.
    ex.run(StepPlan(ahead_commands=[UnmapCommand(random.choice(running), 1, 1)]))
    assert event.waits == 1 and ex.counters.unmap_fences == 1
    assert [type(c) for c in applied] == [UnmapCommand, MapCommand, MapCommand, UnmapCommand]


def test_the_fence_follows_the_last_launched_step() -> None:
    ex, _ = make_executor()
    ex.run(StepPlan(inputs=[span(3)]))
    ex.mark_launched()
    ex.run(StepPlan(inputs=[span(7)]))
    ex.mark_launched()  # slot 3's step has been read since: only slot 7 is in flight
    event = InFlight()
    ex._last_launch_done = event  # type: ignore[assignment]
    ex.run(StepPlan(kv_commands=[UnmapCommand(3, 0, 1)]))
    assert event.waits == 0
    ex.run(StepPlan(kv_commands=[UnmapCommand(7, 0, 1)]))
    assert event.waits == 1
