"""StepExecutor: a forward pass whose pool-backed workspace runs out (torch's
``OutOfMemoryError`` from the runner, after its own release-and-retry) becomes a
``RuntimeError`` that names the step, the plan's numbers and the pool's, before and
after the mapper's pending commands. Stand-ins for the pool, arena and runner (the
workspace itself is CUDA only)."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vtensor.engine.executor import StepExecutor, StepPlan
from vtensor.engine.runner import SpanInput
from vtensor.engine.stats import StepCounters
from vtensor.memory.pool import PoolStats


def _span(slot: int, tokens: int) -> SpanInput:
    return SpanInput(rid=slot, slot=slot, start=0, ids=[1] * tokens, unread=False, samples=True)


def test_workspace_oom_names_the_plan_and_the_pool() -> None:
    r = random.Random()
    capacity, created, held = r.randint(900, 1000), r.randint(500, 899), r.randint(1, 400)
    mapped, waits = r.randint(0, created - held), []
    pool = SimpleNamespace(
        chunk_size=2 << 20,
        capacity_chunks=capacity,
        stats=lambda: PoolStats(2 << 20, capacity, created, 0, created, created, 0),
    )
    arena = SimpleNamespace(
        pool=pool,
        geometry=SimpleNamespace(chunks_for=lambda tokens: 1),
        apply=lambda commands: None,
        wait_ready=lambda spans: list(spans),
        wait_all=lambda: waits.append(1),
        stats=lambda: SimpleNamespace(mapped_bytes=mapped * pool.chunk_size),
    )
    ws_arena = SimpleNamespace(
        stats=lambda: SimpleNamespace(
            held_chunks=held, peak_chunks=held + 3, allocations=7, refused=2
        )
    )
    workspace = SimpleNamespace(held_chunks=held, arena=ws_arena, release_cached=lambda: 0)

    def execute(spans: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.19 GiB")

    runner = SimpleNamespace(device=torch.device("cpu"), workspace=workspace, execute=execute)
    executor = StepExecutor(arena, runner, None, StepCounters())  # type: ignore[arg-type]
    tokens = [r.randint(1, 5000), 1, 1]
    plan = StepPlan(
        inputs=[_span(i, n) for i, n in enumerate(tokens)],
        pool_chunks=capacity - held - 10,
        pool_need=capacity - held - 20,
    )
    with pytest.raises(RuntimeError) as err:
        executor.run(plan)
    text = str(err.value)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)
    assert f"a step of {sum(tokens)} tokens over 3 spans" in text
    assert (
        f"plan: pool {capacity - held - 10} chunks, KV and scratch need {capacity - held - 20}"
        in text
    )
    assert f"pool capacity {capacity} created {created}" in text
    assert f"workspace holds {held} (peak {held + 3}, 7 runs, 2 refused); KV maps {mapped}" in text
    assert "After the mapper:" in text and waits  # it waited for the mapper before the second look
