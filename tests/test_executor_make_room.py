"""StepExecutor._make_room's release rule for the unified pool's workspace cache, with
stand-ins for the pool and the workspace: when it gives the cache back, and why it is
counted (the KV needs the cache's chunks, or the step may outgrow the cache beside the
KV). The rule itself runs on CUDA only (the workspace is a torch MemPool); here its
arithmetic and counters are checked on the CPU."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from vtensor.engine.executor import StepExecutor
from vtensor.engine.stats import StepCounters


class FakeWorkspace:
    def __init__(self, held: int) -> None:
        self.held_chunks = held
        self.released = 0

    def release_cached(self) -> int:
        before, self.held_chunks = self.held_chunks, 0
        self.released += 1
        return before


def _reasons(c: StepCounters) -> tuple[int, int]:
    return c.workspace_releases_for_kv, c.workspace_releases_for_step


def _executor(capacity: int, held: int) -> tuple[StepExecutor, FakeWorkspace, StepCounters]:
    workspace = FakeWorkspace(held)
    pool = SimpleNamespace(capacity_chunks=capacity)
    runner = SimpleNamespace(device=torch.device("cpu"), workspace=workspace)
    counters = StepCounters()
    executor = StepExecutor(SimpleNamespace(pool=pool), runner, None, counters)  # type: ignore[arg-type]
    return executor, workspace, counters


def test_release_reasons_are_counted() -> None:
    # The KV will need 90 of 100 chunks; the cache holds 20: it must go (for the KV).
    ex, ws, c = _executor(100, 20)
    ex._make_room(chunks=80, need=90)
    assert ws.released == 1 and (c.workspace_releases_for_kv, c.workspace_releases_for_step) == (
        1,
        0,
    )
    # The cache (10) fits beside the KV's need (60), but the step may use 40 > 10 and 10 + 40 > 40.
    ex, ws, c = _executor(100, 10)
    ex._make_room(chunks=60, need=60)
    assert ws.released == 1 and (c.workspace_releases_for_kv, c.workspace_releases_for_step) == (
        0,
        1,
    )
    # A step no larger than the cache, beside a KV that fits: nothing released.
    ex, ws, c = _executor(100, 30)
    ex._make_room(chunks=70, need=60)
    assert ws.released == 0 and _reasons(c) == (0, 0)
    assert c.workspace_release_s == 0.0


def test_the_rule_against_its_statement() -> None:
    """Random states: released exactly when the KV's need leaves the cache no room, or
    the step's room exceeds the cache and both would not fit; one reason counted each."""
    for _ in range(500):
        capacity = random.randint(1, 200)
        held = random.randint(0, capacity)
        chunks = random.randint(0, capacity)
        need = random.randint(0, capacity)
        ex, ws, c = _executor(capacity, held)
        room, left = capacity - chunks, capacity - need
        for_kv = held > left
        for_step = not for_kv and held > 0 and room > held and held + room > left
        ex._make_room(chunks, need)
        assert ws.released == int(for_kv or for_step)
        assert _reasons(c) == (int(for_kv), int(for_step))
