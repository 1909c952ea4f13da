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
  with compute: a first slice; see docs/architecture.md.)
* copy-in: the fresh chunks' maps are applied and waited for first (the
  executor's ``wait_ready``), the copy is queued, and the compute stream waits
  for it (a stream wait, no host block) before the forward pass. A host slot
  freed by a copy-in is reused only by a later copy on the same in-order stream.

Without CUDA the copies are plain ``copy_`` calls on the caller's thread: done
when they return, so the same ordering holds trivially.
"""

from __future__ import annotations

import time
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
        self.arena_bytes = arena.vt.view(torch.uint8, (arena.vt.nbytes,))
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self._out_bytes = self._in_bytes = 0
        self._out_s = self._in_s = 0.0
        self._pending_in: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def copy_out(self, slot: int, extent: HostExtent) -> None:
        """Copy the extent's chunks of arena ``slot`` to its host slots; returns once
        they are on the host (the caller then unmaps them)."""
        if not extent.count:
            return
        self._out_bytes += extent.count * self.chunk
        if self.stream is None:
            t0 = time.perf_counter()
            self._copy(slot, extent, to_host=True)
            self._out_s += time.perf_counter() - t0
            return
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            start.record()  # after the wait: the copy's own time, not the step's
            self._copy(slot, extent, to_host=True)
            done.record()
        done.synchronize()
        self._out_s += start.elapsed_time(done) / 1e3

    def copy_in(self, slot: int, extent: HostExtent) -> None:
        """Queue the copy of the extent's host slots back into arena ``slot`` (mapped
        already); the compute stream waits for it before anything later reads them."""
        if not extent.count:
            return
        self._in_bytes += extent.count * self.chunk
        if self.stream is None:
            t0 = time.perf_counter()
            self._copy(slot, extent, to_host=False)
            self._in_s += time.perf_counter() - t0
            return
        start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # maps are host-side
        with torch.cuda.stream(self.stream):
            start.record()
            self._copy(slot, extent, to_host=False)
            done.record()
        torch.cuda.current_stream(self.device).wait_event(done)
        self._pending_in.append((start, done))
        self._count_done_ins()  # bounded: the events of copies still in flight

    def stats(self) -> SwapStats:
        self._count_done_ins()
        return SwapStats(self._out_bytes, self._in_bytes, self._out_s, self._in_s)

    def _count_done_ins(self) -> None:
        """Add the time of the copy-ins that completed (in stream order: oldest first)."""
        while self._pending_in and self._pending_in[0][1].query():
            start, done = self._pending_in.pop(0)
            self._in_s += start.elapsed_time(done) / 1e3

    def close(self) -> None:
        """Free the host buffer (after the caller synchronized: no copy in flight)."""
        self.host.close()

    def _copy(self, slot: int, extent: HostExtent, to_host: bool) -> None:
        assert self._buf is not None
        host, chunk = self._buf.tensor, self.chunk
        base = slot * self.slot_bytes + extent.first * chunk
        for i, h, n in _runs(extent.host_slots):
            dev = self.arena_bytes[base + i * chunk : base + (i + n) * chunk]
            hst = host[h * chunk : (h + n) * chunk]
            if to_host:
                copy_bytes(hst, dev)
            else:
                copy_bytes(dev, hst)


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
