"""Decode attention over a KV arena whose coldest chunks are host-located (issue 14's
heterogeneous mapping), against the same arena all on the device.

The arena is a real :class:`KVArena` (token-major layout, one reservation over CUDA
VMM) of ``slots`` request slots; every chunk of every slot stays mapped, and the
first ``host_chunks`` of each slot (its earliest, coldest tokens) are swapped between
device-located chunks and host-located ones (``VirtualTensor.map(..., pool=host)``)
with no copy: after a remap the new chunks' rows are refilled with random values, so
no call reads what another location left behind. Every remap is checked against the
driver: each chunk of the range is asked, by address, where it lives and whether the
device may read and write it.

A call is one decode over one layer view for ``batch`` requests of ``ctx`` tokens;
:func:`time_decode` replays one layer per call in a CUDA graph (``kernel_timing``:
a replay reads >= 256 MiB where the layers allow, so no call finds its K/V in L2).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from vtensor.kernels.decode import decode_attention
from vtensor.kernels.splitk import DecodeWorkspace
from vtensor.kvcache import KVArena, KVLayout
from vtensor.memory import ChunkPool
from vtensor.memory.cuda import CudaBackend

from .kernel_timing import graph_ms, rotation

Q_HEADS = 32  # Llama-3-8B: 32 query heads over 8 KV heads


@dataclass(frozen=True)
class DecodeTime:
    batch: int
    ctx: int
    host_chunks: int  # per request
    host_share: float  # of each request's chunks
    ms_per_call: float
    bytes_per_call: int  # K and V of one layer, every request's ctx tokens
    host_bytes_per_call: int
    calls_per_replay: int

    @property
    def gbs(self) -> float:
        return self.bytes_per_call / (self.ms_per_call * 1e6)


class HeteroArena:
    """A KV arena whose slots' first ``host_chunks`` chunks can be host-located."""

    def __init__(self, layout: KVLayout, dev_pool: ChunkPool, host_pool: ChunkPool) -> None:
        self.layout, self.dev_pool, self.host_pool = layout, dev_pool, host_pool
        self.device = dev_pool.backend.device
        self.arena = KVArena(layout, dev_pool, self.device)
        self.vt = self.arena.vt
        self.cs = dev_pool.chunk_size
        self.slot_chunks = layout.slot_stride * layout.itemsize // self.cs
        self.vt.map(0, self.vt.nbytes)  # every chunk on the device to begin with
        self.host_chunks = 0
        self.arena.tensor.normal_()

    def chunks_for(self, ctx: int) -> int:
        return -(-ctx * self.layout.bytes_per_token // self.cs)

    def set_host_chunks(self, n: int) -> None:
        """Make chunks ``[0, n)`` of every slot host-located and the rest device-located;
        only the chunks that change location are remapped (and refilled)."""
        lo, hi = sorted((self.host_chunks, n))
        if lo == hi:
            return
        to_host = n > self.host_chunks
        for slot in range(self.layout.num_slots):
            off = (slot * self.slot_chunks + lo) * self.cs
            self.vt.unmap(off, (hi - lo) * self.cs)
            self.vt.map(off, (hi - lo) * self.cs, pool=self.host_pool if to_host else None)
        self.host_chunks = n
        self._refill(lo, hi)
        self.verify()

    def _refill(self, lo: int, hi: int) -> None:
        per_chunk = self.cs // self.layout.bytes_per_token  # whole tokens: slots are aligned
        t0, t1 = lo * per_chunk, min(hi * per_chunk, self.layout.max_tokens)
        self.arena.tensor[:, t0:t1].normal_()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def verify(self) -> None:
        """Chunk by chunk, ``[0, host_chunks)`` of each slot is the host pool's and the
        rest the device pool's; on CUDA the driver agrees (asked by address: host- or
        device-located) and the device may read and write all of it."""
        backend = self.dev_pool.backend
        cuda = backend if isinstance(backend, CudaBackend) else None
        for slot in range(self.layout.num_slots):
            for i in range(self.slot_chunks):
                index = slot * self.slot_chunks + i
                want = "host" if i < self.host_chunks else "device"
                owner = "host" if self.vt.owner(index) is self.host_pool else "device"
                va = self.vt.va + index * self.cs
                got = cuda.location_at(va).kind if cuda else owner
                if got != want or owner != want:
                    raise AssertionError(
                        f"slot {slot} chunk {i}: pool {owner}, driver {got}, want {want}"
                    )
                if cuda and not cuda.device_can_access(va):
                    raise AssertionError(f"slot {slot} chunk {i}: no device read/write access")

    def close(self) -> None:
        self.arena.close()


def time_decode(
    h: HeteroArena,
    batch: int,
    ctx: int,
    workspace: DecodeWorkspace,
    timer: Callable[[Sequence[Callable[[], object]]], float] = graph_ms,
) -> DecodeTime:
    """ms per decode call over ``batch`` requests (slots ``0..batch-1``) of ``ctx``
    tokens, one layer per call, CUDA-graph replayed (``timer``; see the module doc)."""
    lay = h.layout
    if batch > lay.num_slots or ctx > lay.max_tokens:
        raise ValueError(f"batch {batch} x ctx {ctx} does not fit {lay}")
    dev = h.device
    q = torch.randn(batch, Q_HEADS, lay.head_dim, device=dev).to(lay.dtype)
    rows = torch.tensor([lay.row_start(s) for s in range(batch)], dtype=torch.int32, device=dev)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    call_bytes = batch * ctx * 2 * lay.num_kv_heads * lay.head_dim * lay.itemsize
    rot = rotation(call_bytes, lay.num_layers)
    views = h.arena.views[:rot]

    def call(k: torch.Tensor, v: torch.Tensor) -> object:
        return decode_attention(q, k, v, rows, lens, ctx, out=out, workspace=workspace)

    calls = [functools.partial(call, k, v) for k, v in views]
    ms = timer(calls)
    if not torch.isfinite(out.float()).all():
        raise AssertionError(f"decode output not finite at batch {batch}, ctx {ctx}")
    n_chunks = h.chunks_for(ctx)
    host = min(h.host_chunks, n_chunks)
    host_tokens = min(ctx, host * h.cs // lay.bytes_per_token)
    host_bytes = batch * host_tokens * 2 * lay.num_kv_heads * lay.head_dim * lay.itemsize
    return DecodeTime(batch, ctx, host, host / n_chunks, ms, call_bytes, host_bytes, rot)
