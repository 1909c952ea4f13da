"""KVSwapper: the host KV tier's memory and the copies between it and the arena.

The tier is one page-locked host buffer (``memory/pinned.py``) of ``slots``
chunk-sized host slots; which slot holds which chunk is torch-free bookkeeping
(``kvcache/host_tier.py``). A chunk at index ``i`` of arena slot ``s`` is the
contiguous byte range ``s * slot_bytes + i * chunk`` of the arena's virtual
tensor (the layout is token-major), so a run of chunks whose host slots are
consecutive is one copy.

Ordering (why a step never reads a chunk in flight, and an unmap never races a
copy). All copies run on one side *copy stream* (CUDA), in order:

* copy-out: the copy stream first waits for the compute stream (the KV it copies
  may still be written by a step in flight), then the host waits for the copy
  to finish before the step's unmaps are queued on the mapper. So the chunks go
  back to the pool only once copied. (The host wait does not overlap the copy
  with compute: a first slice; see docs/architecture.md.) A spill's copy-out
  waits on the GPU only for the steps that may still write its blocks (``after``:
  the events ``spill.py`` recorded after the steps that made them cached blocks),
  so the host waits for the copy alone, not for the steps queued before it.
* copy-in: the fresh chunks' maps are applied and waited for first (the
  executor's ``wait_ready``), the copy is queued, and the compute stream waits
  for it (a stream wait, no host block) before the forward pass. A host slot
  freed by a copy-in is reused only by a later copy on the same in-order stream.

Without CUDA the copies are plain ``copy_`` calls on the caller's thread: done
when they return, so the same ordering holds trivially.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.host_tier import HostExtent
from vtensor.memory.pinned import PinnedHostMemory


@dataclass(frozen=True)
class SwapStats:
    out_bytes: int
    in_bytes: int
    out_s: float  # copy-out time (CUDA: by events on the copy stream; the host waits too)
    in_s: float  # copy-in time (CUDA: by events, counted once they completed)


class KVSwapper:
    def __init__(self, arena: KVArena, slots: int, device: torch.device) -> None:
        geo = arena.geometry
        self.chunk = geo.chunk_size
        self.slot_bytes = geo.slot_bytes
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = PinnedHostMemory(pin=self.cuda)
        self._buf = self.host.alloc(slots * self.chunk) if slots else None
        self.arena = arena
        self.arena_bytes = arena.vt.view(torch.uint8, (arena.vt.nbytes,))
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # Counted apart: swap's copies (False) and prefix-cache spill's (True, spill.py).
        self._acc = {False: _Tally(), True: _Tally()}
        # Copies not seen complete yet, in stream order: (start, done, tally, out?).
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event, _Tally, bool]] = []
        self._deferred: list[torch.cuda.Event] = []  # copy-ins the compute stream awaits later

    def copy_out(self, slot: int, extent: HostExtent) -> None:
        """Copy the extent's chunks of arena ``slot`` to its host slots; returns once
        they are on the host (the caller then unmaps them)."""
        base = slot * self.slot_bytes + extent.first * self.chunk
        self.copy_out_from([(self.arena_bytes, base, extent.host_slots)])

    def copy_out_from(
        self,
        ranges: list[tuple[torch.Tensor, int, tuple[int, ...]]],
        spill: bool = False,
        after: Sequence[torch.cuda.Event] | None = None,
    ) -> None:
        """Copy each ``(device bytes, byte offset, host slots)`` range (one chunk per
        host slot, consecutive from the offset) to the host; returns once all are there.
        The copies are ordered after every step queued so far (they may read its KV),
        or, given ``after``, only after those events (the caller knows which steps may
        still write what it copies: ``spill.py``; an empty list: none)."""
        done = self.copy_out_queued(ranges, spill, after)
        if done is not None:
            done.synchronize()
            self._count_done()

    def copy_out_queued(
        self,
        ranges: list[tuple[torch.Tensor, int, tuple[int, ...]]],
        spill: bool = False,
        after: Sequence[torch.cuda.Event] | None = None,
    ) -> torch.cuda.Event | None:
        """``copy_out_from`` without the host wait: returns the copies' completion event
        (None: nothing to wait for; without CUDA they are done on return). The compute
        stream waits for it: anything queued from now on (a step writing over a copied
        chunk in place) runs after the copies. The source ranges must stay mapped, and
        the chunks unused by anything else, until the event completes."""
        count = sum(len(h) for _, _, h in ranges)
        if not count:
            return None
        acc = self._acc[spill]
        acc.out_bytes += count * self.chunk
        if self.stream is None:
            t0 = time.perf_counter()
            for dev, base, slots in ranges:
                self._copy_runs(dev, base, slots, to_host=True)
            acc.out_s += time.perf_counter() - t0
            return None
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        compute = torch.cuda.current_stream(self.device)
        if after is None:
            self.stream.wait_stream(compute)
        else:
            for event in after:
                self.stream.wait_event(event)
        with torch.cuda.stream(self.stream):
            start.record()  # after the wait: the copy's own time, not the step's
            for dev, base, slots in ranges:
                self._copy_runs(dev, base, slots, to_host=True)
            done.record()
        compute.wait_event(done)
        self._pending.append((start, done, acc, True))
        return done

    def copy_in(
        self, slot: int, extent: HostExtent, spill: bool = False, defer: bool = False
    ) -> None:
        """Queue the copy of the extent's host slots back into arena ``slot`` (mapped
        already). The compute stream waits for it before anything queued later, or, with
        ``defer``, from :meth:`wait_deferred` on: work queued in between (a forward pass
        that does not read the slot) overlaps the copy."""
        if not extent.count:
            return
        # Its chunks' maps: the executor waited only for the step's spans' (a request
        # swapped in has none in this step).
        self.arena.wait_ready([(slot, extent.first + extent.count)])
        acc = self._acc[spill]
        acc.in_bytes += extent.count * self.chunk
        if self.stream is None:
            t0 = time.perf_counter()
            self._copy(slot, extent, to_host=False)
            acc.in_s += time.perf_counter() - t0
            return
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # maps are host-side
        with torch.cuda.stream(self.stream):
            start.record()
            self._copy(slot, extent, to_host=False)
            done.record()
        if defer:
            self._deferred.append(done)
        else:
            torch.cuda.current_stream(self.device).wait_event(done)
        self._pending.append((start, done, acc, False))
        self._count_done()  # bounded: the events of copies still in flight

    def wait_deferred(self) -> int:
        """The compute stream waits for the deferred copy-ins (anything queued from now
        on is ordered after them: the next step that reads their slots, and the step's
        launch event, which the unmap fence waits on). Returns how many there were."""
        waited, self._deferred = self._deferred, []
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        for done in waited:
            assert stream is not None
            stream.wait_event(done)
        return len(waited)

    def stats(self, spill: bool = False) -> SwapStats:
        """Swap's copies, or (``spill``) prefix-cache spill's."""
        self._count_done()
        a = self._acc[spill]
        return SwapStats(a.out_bytes, a.in_bytes, a.out_s, a.in_s)

    def _count_done(self) -> None:
        """Add the time of the copies that completed (in stream order: oldest first)."""
        while self._pending and self._pending[0][1].query():
            start, done, acc, out = self._pending.pop(0)
            if out:
                acc.out_s += start.elapsed_time(done) / 1e3
            else:
                acc.in_s += start.elapsed_time(done) / 1e3

    def close(self) -> None:
        """Free the host buffer (after the caller synchronized: no copy in flight)."""
        self.host.close()

    def _copy(self, slot: int, extent: HostExtent, to_host: bool) -> None:
        base = slot * self.slot_bytes + extent.first * self.chunk
        self._copy_runs(self.arena_bytes, base, extent.host_slots, to_host)

    def _copy_runs(
        self, dev_bytes: torch.Tensor, base: int, host_slots: tuple[int, ...], to_host: bool
    ) -> None:
        assert self._buf is not None
        host, chunk = self._buf.tensor, self.chunk
        for i, h, n in _runs(host_slots):
            dev = dev_bytes[base + i * chunk : base + (i + n) * chunk]
            hst = host[h * chunk : (h + n) * chunk]
            if to_host:
                copy_bytes(hst, dev)
            else:
                copy_bytes(dev, hst)


@dataclass
class _Tally:
    out_bytes: int = 0
    in_bytes: int = 0
    out_s: float = 0.0
    in_s: float = 0.0


def copy_bytes(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One run's copy, queued on the current (copy) stream; tests slow it down."""
    dst.copy_(src, non_blocking=True)


def _runs(host_slots: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """``(chunk offset, first host slot, count)`` runs of consecutive host slots."""
    runs: list[tuple[int, int, int]] = []
    for i, h in enumerate(host_slots):
        if runs and runs[-1][1] + runs[-1][2] == h:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((i, h, 1))
    return runs
