"""SpillCopier: the engine's side of prefix-cache spill to the host KV tier.

The radix cache decides (``kvcache/radix_spill.py``): an evicted block goes to
the host tier if it has room, and a later hit may restore it. Here its copies
run, on swap's copy stream and pinned buffer (``swap.py``):

* **Copy-out.** A spilled block's chunks may be mapped by no slot (only the
  cache holds them), so they are first mapped into a small *staging* range (a
  virtual tensor of its own over the same pool: ``MapHeld`` on the arena's
  mapper, in order with the step's commands). The step's commands are applied
  in segments: everything before the cache-drop command of a spilled chunk
  (which also holds its adoption, if it came this very step), then the copy,
  then the rest. The copy waits on the GPU only for the steps in flight that may
  still write its blocks (``spill_writers.py``: none, for a block cached before
  the steps in flight) and the host waits for the copy; only then is the staging
  range unmapped and the drop applied, so the chunk goes back to the pool after
  the copy, as swap-out's do. A spilled block whose key left the tier before its
  copy (dropped for room, reset, or offered again by a request) is not copied.
* **Copy-in.** A restored block's fresh chunks are mapped by the step's own
  commands (at its indices in the new request's slot); the copy is queued in
  the executor's ``before_forward`` hook, once they are mapped, and the compute
  stream waits for it: no step reads a chunk whose copy is in flight. Its host
  slots go back to the tier at once: a later copy reusing them is on the same
  in-order copy stream.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.arena_ops import MapHeld
from vtensor.kvcache.commands import CacheDropCommand, KVCommand
from vtensor.kvcache.host_tier import HostExtent, HostTier, SwapState
from vtensor.kvcache.prefix_cache import SpillOut
from vtensor.memory import Unmap, VirtualTensor

from .executor import Segment
from .spill_writers import BlockWriters
from .swap import KVSwapper
from .swap_driver import SwapDriver


@dataclass
class SpillCounters:
    out_blocks: int = 0  # blocks copied to the host
    in_blocks: int = 0  # blocks copied back in
    skipped: int = 0  # spilled blocks whose key left the tier before their copy


class SpillCopier:
    def __init__(
        self, arena: KVArena, swapper: KVSwapper, tier: HostTier, stage_chunks: int = 64
    ) -> None:
        self.arena, self.swapper, self.tier = arena, swapper, tier
        self.chunk = arena.geometry.chunk_size
        self.stage_chunks = stage_chunks
        self.stage = VirtualTensor(arena.pool, stage_chunks * self.chunk)
        self.stage_bytes = self.stage.view(torch.uint8, (self.stage.nbytes,))
        self.counters = SpillCounters()
        self.writers = BlockWriters(torch.cuda.Event if swapper.cuda else None)

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
        """Copy the spilled blocks to their host slots through the staging range,
        ``stage_chunks`` at a time; done on return (the tier marks them resident)."""
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
        """Free the staging range (nothing is mapped there between copies)."""
        self.stage.close()

    def _copy_batch(self, batch: list[SpillOut]) -> None:
        if not batch:
            return
        chunk, ops, ranges = self.chunk, [], []
        at = 0
        for s in batch:
            ext = self.tier.extent(s.key)
            assert ext is not None
            ops.append(MapHeld(self.stage, at * chunk, s.chunks, self.arena.held))
            ranges.append((self.stage_bytes, at * chunk, ext.host_slots))
            at += len(s.chunks)
        self.arena.mapper.submit(ops).wait()  # after the commands before: holds included
        try:
            after = self.writers.after(c for s in batch for c in s.chunks)
            self.swapper.copy_out_from(ranges, spill=True, after=after)
        finally:
            self.arena.mapper.submit([Unmap(self.stage, 0, at * chunk)]).wait()
        for s in batch:
            self.tier.end_out(s.key)
            self.counters.out_blocks += 1

    def _pending(self, s: SpillOut) -> bool:
        ext = self.tier.extent(s.key)
        return ext is not None and ext.state is SwapState.COPYING_OUT


def spill_copier(arena: KVArena, swap: SwapDriver | None, allowed: bool) -> SpillCopier | None:
    """The copier over swap's tier (None: no host tier, or spill not ``allowed``)."""
    if swap is None or not allowed:
        return None
    return SpillCopier(arena, swap.swapper, swap.planner.tier)
