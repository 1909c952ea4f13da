"""StepExecutor: one rank's device side of a step, the same code on every rank.

Rank 0 turns its scheduler's plan into a :class:`StepPlan` (plain ints: KV
commands and the runner's inputs); under tensor parallelism it broadcasts the
plan to the other ranks first, and every rank hands it to its own executor:

1. ``run``: the KV commands go to this rank's arena (the one place they reach an
   arena), the step waits for the chunks it touches, the runner queues the
   forward pass (with the group's collectives inside) and returns the logits;
2. ``write_tokens``: rank 0 has drawn from the logits; its sampled tokens go into
   every rank's token table (a broadcast on the device group, queued on the
   stream like a kernel: async scheduling never waits for it);
3. ``mark_launched``: the event that an unmap of a slot this step touched waits
   for while the step may still run.

Every rank's arena has the same layout (``models/parallel.py``), so rank 0's
commands, computed from its own books, fit every arena.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vtensor.distributed import TPGroup
from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.manager import KVCommand, UnmapCommand

from .runner import ForwardOutput, ModelRunner, SpanInput
from .stats import StepCounters

# Commands to apply, then a hook to run before the next ones (None: none).
Segment = tuple[list[KVCommand], Callable[[], None] | None]


@dataclass(frozen=True)
class StepPlan:
    """What every rank needs for one step, in the order it applies it."""

    kv_commands: list[KVCommand] = field(default_factory=list)  # needed by this step
    ahead_commands: list[KVCommand] = field(default_factory=list)  # for later steps
    inputs: list[SpanInput] = field(default_factory=list)  # none: only KV commands
    # The unified pool (engine/elastic.py): the pool's capacity for this step, scratch
    # included (None: unchanged), and the most chunks the scratch slot and the KV hold
    # while the step's commands apply (the pool-backed workspace needs the rest).
    pool_chunks: int | None = None
    pool_need: int | None = None

    @property
    def samples(self) -> int:
        """Spans that draw a token (the size of the step's token broadcast)."""
        return sum(sp.samples for sp in self.inputs)


class StepExecutor:
    def __init__(
        self, arena: KVArena, runner: ModelRunner, group: TPGroup, counters: StepCounters
    ) -> None:
        self.arena = arena
        self.runner = runner
        self.group = group
        self.counters = counters
        self.device = runner.device
        self._running_slots: frozenset[int] = frozenset()  # the last queued step's
        # Launched steps not yet seen complete, oldest first: the unmap fences.
        self._in_flight: deque[Launch] = deque()
        self._new_event: Callable[[], DoneEvent] | None = None
        self._kv_share: int | None = None  # the last step's (the unified pool's)
        if self.device.type == "cuda":
            self._new_event = torch.cuda.Event

    def run(
        self,
        plan: StepPlan,
        before_forward: Callable[[], None] | None = None,
        segments: tuple[list[Segment], list[Segment]] | None = None,
    ) -> ForwardOutput | None:
        """Apply the plan's KV commands, then queue its forward pass (None: no spans).
        ``before_forward`` runs once the step's chunks are mapped (swap-ins copy then).
        ``segments``: the two command lists split where a hook must run between them
        (a spilled block's copy-out before its drop: ``spill.py``)."""
        if self.runner.workspace is not None:
            wait = self._make_room(plan.pool_chunks, plan.pool_need)
            self._apply_kv(plan, segments)
            # Spilled chunks go back to the pool only once their copy-out completed, on
            # the mapper (spill.py); the forward's workspace may need them at once.
            if wait or segments is not None:
                self._wait_unmaps()
        else:
            shrink = self._grow_pool(plan.pool_chunks)
            self._apply_kv(plan, segments)
            if shrink is not None:
                self._shrink_pool(shrink)
        if before_forward is not None:
            before_forward()
        if not plan.inputs:
            return None
        self._running_slots = frozenset(sp.slot for sp in plan.inputs)
        if self.runner.workspace is None:
            return self.runner.execute(plan.inputs)
        try:
            return self.runner.execute(plan.inputs)
        except torch.OutOfMemoryError as exc:
            raise RuntimeError(self._describe_room(plan)) from exc

    def _describe_room(self, plan: StepPlan) -> str:
        """Why the unified pool's workspace ran out: the plan's numbers and the pool's,
        before and after the mapper's pending commands."""
        workspace = self.runner.workspace
        assert workspace is not None
        tokens = sum(sp.num_tokens for sp in plan.inputs)

        def state() -> str:
            p, a = self.arena.pool.stats(), workspace.arena.stats()
            return (
                f"pool capacity {p.capacity_chunks} created {p.created} free {p.free} "
                f"in use {p.in_use}; workspace holds {a.held_chunks} (peak {a.peak_chunks}, "
                f"{a.allocations} runs, {a.refused} refused); KV maps "
                f"{self.arena.stats().mapped_bytes // self.arena.pool.chunk_size}"
            )

        before = state()
        self._wait_unmaps()
        return (
            f"the unified pool's workspace ran out in a step of {tokens} tokens over "
            f"{len(plan.inputs)} spans (plan: pool {plan.pool_chunks} chunks, KV and "
            f"scratch need {plan.pool_need}). Then: {before}. After the mapper: {state()}"
        )

    def write_tokens(self, forward: ForwardOutput, tokens: torch.Tensor | None) -> None:
        """The step's sampled tokens into this rank's token table: rank 0 passes its
        draw's, the others ``None`` and receive rank 0's."""
        if tokens is None:
            rows = forward.sample_slots.shape[0]
            tokens = torch.empty(rows, dtype=torch.long, device=self.device)
        self.runner.tokens.write(forward.sample_slots, self.group.broadcast(tokens))

    def mark_launched(self) -> None:
        if self._new_event is not None:
            done = self._new_event()
            done.record()
            self._in_flight.append(Launch(done, self._running_slots))

    def _grow_pool(self, chunks: int | None) -> int | None:
        """The unified pool's KV share grows (inflate): first give torch's cached
        workspace back to the driver (the KV's new chunks may need that memory; it
        synchronizes the device, once per inflation), then raise the pool's capacity,
        before any map. Returns the capacity to shrink to after the commands, or None."""
        if chunks is None:
            return None
        pool = self.arena.pool
        if chunks == pool.capacity_chunks:
            return None
        if chunks < pool.capacity_chunks:
            return chunks
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        pool.set_capacity(chunks * pool.chunk_size)
        return None

    def _shrink_pool(self, chunks: int) -> None:
        """The KV's share shrinks (deflate): the plan's unmaps freed its chunks; once the
        mapper has applied them, the pool releases what lies beyond the new capacity to
        the driver, before the forward pass whose workspace needs the memory."""
        self._wait_unmaps()
        self.arena.pool.set_capacity(chunks * self.arena.pool.chunk_size)

    def _make_room(self, chunks: int | None, need: int | None) -> bool:
        """The unified pool with the workspace in it (``ModelRunner.workspace``): the pool
        holds the scratch slot, the KV and the workspace, within a fixed capacity.

        Inflate: when the KV will need (``need``, scratch included) chunks that the
        workspace's cache holds, or this step's workspace (its room: the capacity less
        the KV's share ``chunks``) outgrows the cache and fresh segments might not fit
        beside it, the cache goes back
        before the step's maps (it synchronizes the device, and the chunks are unmapped
        from the workspace's range: ~16 us each, ~30 us each to map again; so only when
        needed, not whenever the KV's share grows). Deflate: the share shrank, and the
        plan's unmaps free chunks the forward's workspace may take; returns True, and
        the caller waits for the mapper after queueing the commands."""
        if chunks is None or need is None:
            return False
        workspace, capacity = self.runner.workspace, self.arena.pool.capacity_chunks
        assert workspace is not None
        room, left = capacity - chunks, capacity - need
        held = workspace.held_chunks
        # A step no larger than the cache reuses its segments (torch splits the larger
        # ones); should sizes still not fit, the runner releases and retries the step.
        for_kv = held > left
        if for_kv or (held and room > held and held + room > left):
            t0 = time.perf_counter()
            workspace.release_cached()
            self.counters.workspace_release_s += time.perf_counter() - t0
            if for_kv:
                self.counters.workspace_releases_for_kv += 1
            else:
                self.counters.workspace_releases_for_step += 1
            if workspace.held_chunks > left:  # a tensor outlived its step
                raise RuntimeError(
                    f"the workspace still holds {workspace.held_chunks} chunks after "
                    f"releasing its cache; the KV leaves it {left}"
                )
        deflate = self._kv_share is not None and chunks < self._kv_share
        self._kv_share = chunks
        return deflate

    def _wait_unmaps(self) -> None:
        t0 = time.perf_counter()
        self.arena.wait_all()
        self.counters.kv_sync_s += time.perf_counter() - t0

    def _apply_kv(
        self, plan: StepPlan, segments: tuple[list[Segment], list[Segment]] | None = None
    ) -> None:
        """Queue the plan's commands on the mapper and wait for the chunks this step
        touches.

        Unmapping a slot that a step still on the GPU touched first waits for that step
        (counted as ``unmap_fences``): it may still write the slot, whose request
        finished or was aborted since. That is the last launched step, and any earlier
        one whose tokens were never read (a step that draws nothing, such as a chunk of
        a long prompt, is never waited for). Other slots need no wait: a step touches
        only its spans' slots and the scratch slot, which is never unmapped. Maps need
        no wait. The whole window is timed (the mapper thread can also delay this one
        through the GIL).
        """
        t_kv = time.perf_counter()
        lists = segments or ([(plan.kv_commands, None)], [(plan.ahead_commands, None)])
        for segs in lists:
            for commands, hook in segs:
                self._fence_unmaps(commands)
                self.arena.apply(commands)
                if hook is not None:
                    t_hook = time.perf_counter()
                    hook()
                    self.counters.kv_hook_s += time.perf_counter() - t_hook
        geometry = self.arena.geometry
        self.arena.wait_ready((sp.slot, geometry.chunks_for(sp.end)) for sp in plan.inputs)
        self.counters.kv_sync_s += time.perf_counter() - t_kv

    def _fence_unmaps(self, commands: list[KVCommand]) -> None:
        """Wait for the latest step in flight that touched a slot ``commands`` unmap
        (and so for every step before it: one stream)."""
        unmapped = {c.slot for c in commands if isinstance(c, UnmapCommand)}
        if not unmapped:
            return
        while self._in_flight and self._in_flight[0].done.query():
            self._in_flight.popleft()
        for i in range(len(self._in_flight) - 1, -1, -1):
            if self._in_flight[i].slots & unmapped:
                self.counters.unmap_fences += 1
                t0 = time.perf_counter()
                self._in_flight[i].done.synchronize()
                self.counters.kv_fence_s += time.perf_counter() - t0
                for _ in range(i + 1):
                    self._in_flight.popleft()
                return


class DoneEvent(Protocol):
    """What the fence needs of a CUDA event (tests stand in for it on the CPU)."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass(frozen=True)
class Launch:
    """A launched step: its completion event and the slots it touched."""

    done: DoneEvent
    slots: frozenset[int]
