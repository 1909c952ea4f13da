"""SpillCopier: the engine's side of prefix-cache spill to the host KV tier.

The radix cache decides (``kvcache/radix_spill.py``): an evicted block goes to
the host tier if it has room, and a later hit may restore it. Here its copies
run, on swap's copy stream and pinned buffer (``swap.py``):

* **Copy-out.** A spilled block's chunks may be mapped by no slot (only the
  cache holds them), so they are first mapped into a *staging* ring (a virtual
  tensor of its own over the same pool: ``MapHeld`` on the arena's mapper, in
  order with the step's commands; the host waits for these maps, since the copy
  reads through them). The step's commands are applied in segments: everything
  before the cache-drop command of a spilled chunk (which also holds its
  adoption, if it came this very step), then the copy, then the rest. The copy
  waits on the GPU only for the steps in flight that may still write its blocks
  (``spill_writers.py``: none, for a block cached before the steps in flight); the
  compute stream waits for the copy (a step may write over a chunk reused in
  place). **The host does not wait for the copy**: the staging range's unmap is
  queued on the mapper behind it (``UnmapAfterCopy``: the mapper thread waits for
  the copy's event). The staging mappings hold the chunks' pool references, so a
  spilled chunk goes back to the pool only then, once copied, whatever the order
  of the drop; a map that needs it waits on the mapper, and the host only where a
  step needs that map (``wait_ready``). A spilled block whose key left the tier
  before its copy (dropped for room, reset, or offered again by a request) is not
  copied.
* **Copy-in.** A restored block's fresh chunks are mapped by the step's own
  commands (at its indices in the new request's slot); the copy is queued in
  the executor's ``before_forward`` hook, once they are mapped, and the compute
  stream waits for it: no step reads a chunk whose copy is in flight. Its host
  slots go back to the tier at once: a later copy reusing them is on the same
  in-order copy stream.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.arena_ops import MapHeld
from vtensor.kvcache.commands import CacheDropCommand, KVCommand
from vtensor.kvcache.host_tier import HostExtent, HostTier, SwapState
from vtensor.kvcache.prefix_cache import SpillOut
from vtensor.memory import MapperOp, MapTicket, VirtualTensor

from .executor import Segment
from .spill_writers import BlockWriters
from .swap import KVSwapper
from .swap_driver import SwapDriver


@dataclass
class SpillCounters:
    out_blocks: int = 0  # blocks copied to the host
    in_blocks: int = 0  # blocks copied back in
    skipped: int = 0  # spilled blocks whose key left the tier before their copy
    stage_wait_s: float = 0.0  # host time waiting for the staging maps (the mapper's queue)


class SpillCopier:
    def __init__(
        self, arena: KVArena, swapper: KVSwapper, tier: HostTier, stage_chunks: int = 1024
    ) -> None:
        self.arena, self.swapper, self.tier = arena, swapper, tier
        self.chunk = arena.geometry.chunk_size
        # The staging ring: address space only (2 GiB of 2 MiB chunks by default), so a
        # step's spills rarely wrap onto a range whose copy may still be in flight (the
        # map there would then wait for that copy on the mapper, and the host with it).
        self.stage_chunks = stage_chunks
        self.stage = VirtualTensor(arena.pool, stage_chunks * self.chunk)
        self.stage_bytes = self.stage.view(torch.uint8, (self.stage.nbytes,))
        self.counters = SpillCounters()
        self.writers = BlockWriters(torch.cuda.Event if swapper.cuda else None)
        self._cursor = 0  # the staging ring's next free chunk
        self._unmaps: list[MapTicket] = []  # staging unmaps queued, maybe not done

    def segments(
        self, commands: list[KVCommand], spills: list[SpillOut], placed: set[int]
    ) -> list[Segment]:
        """Split ``commands`` before each cache drop of a spilled chunk; each segment's
        hook copies the spills that the next command drops. Adds the spills' keys it
        placed to ``placed``."""
        by_chunk = {s.chunks[0]: s for s in spills if self._pending(s)}
        out: list[Segment] = []
        part: list[KVCommand] = []
        for c in commands:
            if isinstance(c, CacheDropCommand):
                due = [by_chunk.pop(i) for i in c.chunks if i in by_chunk]
                if due:
                    placed.update(s.key for s in due)
                    out.append((part, functools.partial(self.copy_out, due)))
                    part = []
            part.append(c)
        out.append((part, None))
        return out

    def plan(
        self, kv_commands: list[KVCommand], ahead_commands: list[KVCommand], spills: list[SpillOut]
    ) -> tuple[list[Segment], list[Segment]] | None:
        """The step's two command lists in segments (``segments``); None: no spill.
        Called for every step, before its commands are applied (they may hold chunks
        that a later step spills: ``BlockWriters``)."""
        self._reap()
        self.writers.observe(kv_commands)
        self.writers.observe(ahead_commands)
        if not spills:
            return None
        placed: set[int] = set()
        first = self.segments(kv_commands, spills, placed)
        rest = [s for s in spills if s.key not in placed]
        segs = (first, self.segments(ahead_commands, rest, placed))
        missed = [s.key for s in spills if self._pending(s) and s.key not in placed]
        if missed:  # the drop went out another way: the chunks may be gone already
            raise RuntimeError(f"spilled blocks {missed} have no drop in the step's commands")
        self.counters.skipped += len(spills) - len(placed)
        return segs

    def copy_out(self, spills: list[SpillOut]) -> None:
        """Queue the copies of the spilled blocks to their host slots through the
        staging ring, ``stage_chunks`` at a time (the tier marks them resident: any
        later copy of their host slots is queued behind, on the same stream)."""
        batch: list[SpillOut] = []
        for s in spills:
            if sum(len(b.chunks) for b in batch) + len(s.chunks) > self.stage_chunks:
                self._copy_batch(batch)
                batch = []
            batch.append(s)
        self._copy_batch(batch)

    def copy_in(self, restores: list[tuple[int, HostExtent]]) -> None:
        """Queue the restored blocks' copies into their freshly mapped chunks (ahead of
        the forward pass: the compute stream waits for them)."""
        for slot, ext in restores:
            self.swapper.copy_in(slot, ext, spill=True)
            self.tier.end_in(ext.rid)
            self.counters.in_blocks += 1

    def with_restores(
        self, copy_in: Callable[[], None] | None, restores: list[tuple[int, HostExtent]]
    ) -> Callable[[], None] | None:
        """The executor's ``before_forward`` hook: swap-ins' (``copy_in``), then the
        restored blocks' copy-ins (both once the step's chunks are mapped)."""
        if not restores:
            return copy_in

        def hook() -> None:
            if copy_in is not None:
                copy_in()
            self.copy_in(restores)

        return hook

    def mark_launched(self) -> None:
        """The step's work is queued (forward pass or none): see ``BlockWriters``."""
        self.writers.mark_launched()

    def close(self) -> None:
        """Free the staging range, once its unmaps are done (after the device was
        synchronized: no copy in flight)."""
        for ticket in self._unmaps:
            ticket.wait()
        self._unmaps.clear()
        self.stage.close()

    def _copy_batch(self, batch: list[SpillOut]) -> None:
        """Map the batch's chunks at the ring's cursor, queue their copy, and queue the
        range's unmap behind the copy on the mapper (``UnmapAfterCopy``): the host does
        not wait for the copy. A reused range's earlier unmap is ahead on the mapper."""
        if not batch:
            return
        n = sum(len(s.chunks) for s in batch)
        if self._cursor + n > self.stage_chunks:
            self._cursor = 0
        first, chunk, ops, ranges = self._cursor, self.chunk, [], []
        self._cursor += n
        at = first
        for s in batch:
            ext = self.tier.extent(s.key)
            assert ext is not None
            ops.append(MapHeld(self.stage, at * chunk, s.chunks, self.arena.held))
            ranges.append((self.stage_bytes, at * chunk, ext.host_slots))
            at += len(s.chunks)
        t0 = time.perf_counter()
        self.arena.mapper.submit(ops).wait()  # after the commands before: holds included
        self.counters.stage_wait_s += time.perf_counter() - t0
        done = None
        try:
            after = self.writers.after(c for s in batch for c in s.chunks)
            done = self.swapper.copy_out_queued(ranges, spill=True, after=after)
        finally:
            unmap = UnmapAfterCopy(done, self.stage, first * chunk, n * chunk)
            self._unmaps.append(self.arena.mapper.submit([unmap]))
        for s in batch:  # its host slots' next users copy on the same in-order stream
            self.tier.end_out(s.key)
            self.counters.out_blocks += 1

    def _reap(self) -> None:
        """Forget the staging unmaps done (re-raising a mapper error, if any)."""
        while self._unmaps and self._unmaps[0].done():
            self._unmaps.pop(0).wait()

    def _pending(self, s: SpillOut) -> bool:
        ext = self.tier.extent(s.key)
        return ext is not None and ext.state is SwapState.COPYING_OUT


class UnmapAfterCopy(MapperOp):
    """Unmap a staging range once the copy reading it completed: the mapper thread
    waits for the copy's event (None: done already), the host does not. The range's
    mappings hold the spilled chunks' pool references, so the chunks go back to the
    pool here, once copied, and the mapper's ops queued behind (a map that needs
    them) run after it."""

    def __init__(self, done: Any, stage: VirtualTensor, offset: int, nbytes: int) -> None:
        self.done, self.stage, self.offset, self.nbytes = done, stage, offset, nbytes

    def apply(self) -> int:
        if self.done is not None:
            self.done.synchronize()
        return self.stage.unmap(self.offset, self.nbytes)

    def __repr__(self) -> str:
        return f"UnmapAfterCopy(offset={self.offset}, nbytes={self.nbytes})"


def spill_copier(arena: KVArena, swap: SwapDriver | None, allowed: bool) -> SpillCopier | None:
    """The copier over swap's tier (None: no host tier, or spill not ``allowed``)."""
    if swap is None or not allowed:
        return None
    return SpillCopier(arena, swap.swapper, swap.planner.tier)
