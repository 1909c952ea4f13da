"""KV memory for ``vtensor bench kernels``: a dense buffer, and a real VMM arena.

* :class:`DenseArena`: one ``torch.empty`` buffer reused for every grid point;
  requests' rows lie back to back (a slot is exactly the context long) and the
  kernels get ``max_len = ctx``. The kernels alone, at their best.
* :class:`VmmArena`: a :class:`KVArena` per grid point, built as the engine builds
  its own: a reserved virtual range over CUDA VMM (the host backend off the GPU),
  slot 0 a scratch slot, request slots of ``max_model_len`` tokens, and physical
  chunks mapped through the arena's mapper only where the requests' tokens lie.
  Decode gets ``max_len = max_model_len``, as the engine's decode graphs pass it.
  Each point checks that the memory really is VMM-mapped: the views lie in the
  reservation, and the mapped chunks grow from none to what the requests need.

A point fills the requests' rows of its first ``layers`` layers (``KVPoint.layers``):
CUDA-graph timing rotates its calls over them, one layer each, as a decode step
does, so that no call finds its K/V in L2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vtensor.kvcache import KVArena, KVLayout
from vtensor.kvcache.manager import KVGeometry, MapCommand
from vtensor.memory import ChunkPool, open_backend


@dataclass(frozen=True)
class HeadConfig:
    name: str
    q_heads: int
    kv_heads: int
    head_dim: int = 128
    layers: int = 32


@dataclass
class KVPoint:
    """Layer 0's K/V views with ``batch`` requests of ``tokens`` filled rows each, and
    the first few layers' views filled alike (``layers``, layer 0 first, the same rows
    ``starts`` in each)."""

    k: torch.Tensor
    v: torch.Tensor
    starts: torch.Tensor  # int32: each request's first row
    max_len: int  # what a caller passes as the decode ``max_len``
    evidence: dict[str, Any] = field(default_factory=dict)  # how the memory is backed
    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


class Arena(Protocol):
    name: str
    dtype: torch.dtype

    def point(self, cfg: HeadConfig, batch: int, tokens: int, layers: int = 1) -> Any: ...

    def close(self) -> None: ...


class DenseArena:
    name = "dense"

    def __init__(self, budget_bytes: int, device: torch.device, dtype: torch.dtype) -> None:
        self.buf = torch.empty(budget_bytes // dtype.itemsize, dtype=dtype, device=device)
        self.dtype = dtype

    @contextmanager
    def point(
        self, cfg: HeadConfig, batch: int, tokens: int, layers: int = 1
    ) -> Iterator[KVPoint | None]:
        lay = KVLayout(batch, tokens, cfg.layers, cfg.kv_heads, cfg.head_dim, self.buf.dtype)
        if lay.total_bytes > self.buf.numel() * self.buf.itemsize:
            yield None
            return
        arena = self.buf[: lay.total_bytes // lay.itemsize].view(lay.shape)
        kvs = [(lay.k_view(arena, i), lay.v_view(arena, i)) for i in _layers(cfg, layers)]
        starts = torch.arange(batch, device=arena.device, dtype=torch.int32) * tokens
        for k, v in kvs:
            fill_rows(k, v, starts, tokens)
        yield KVPoint(kvs[0][0], kvs[0][1], starts, tokens, {"arena": self.name}, kvs)

    def close(self) -> None:
        del self.buf
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the memory back before the VMM pool takes it


class VmmArena:
    name = "vmm"

    def __init__(
        self,
        budget_bytes: int,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        host_chunk: int | None = None,
    ) -> None:
        if device.type == "cuda":
            backend = open_backend("cuda", device=device.index or 0)
        else:
            backend = open_backend("host", chunk_size=host_chunk)
        self.pool = ChunkPool(backend, budget_bytes)
        self.device, self.dtype, self.max_model_len = device, dtype, max_model_len

    @contextmanager
    def point(
        self, cfg: HeadConfig, batch: int, tokens: int, layers: int = 1
    ) -> Iterator[KVPoint | None]:
        # An engine serving this context needs max_model_len ≥ it.
        max_len = max(self.max_model_len, tokens)
        lay = self._layout(cfg, batch + 1, max_len)
        chunk = self.pool.chunk_size
        scratch, per_request = lay.chunks_for_tokens(1, chunk), lay.chunks_for_tokens(tokens, chunk)
        need = scratch + batch * per_request
        if need > self.pool.capacity_chunks:
            yield None
            return
        arena = KVArena(lay, self.pool, self.device)
        try:
            before = arena.vt.mapped_chunks
            arena.vt.map(0, scratch * chunk)  # the scratch slot: every view's base pointer
            arena.apply([MapCommand(s, 0, per_request) for s in range(1, batch + 1)])
            arena.wait_all()
            # A chunk holds every layer of its tokens: the first `layers` are all mapped.
            kvs = [arena.views[i] for i in _layers(cfg, layers)]
            k0, v0 = kvs[0]
            evidence = check_vmm(arena, k0, before, need)
            starts = torch.arange(1, batch + 1, device=k0.device, dtype=torch.int32)
            starts *= lay.max_tokens
            for k, v in kvs:
                fill_rows(k, v, starts, tokens)
            yield KVPoint(k0, v0, starts, max_len, evidence, kvs)
        finally:
            arena.close()

    def _layout(self, cfg: HeadConfig, slots: int, max_len: int) -> KVLayout:
        token_bytes = 2 * cfg.layers * cfg.kv_heads * cfg.head_dim * self.dtype.itemsize
        max_tokens = KVGeometry.aligned_max_tokens(max_len, token_bytes, self.pool.chunk_size)
        return KVLayout(slots, max_tokens, cfg.layers, cfg.kv_heads, cfg.head_dim, self.dtype)

    def close(self) -> None:
        backend = self.pool.backend
        self.pool.close()
        backend.close()


def _layers(cfg: HeadConfig, layers: int) -> range:
    if not 1 <= layers <= cfg.layers:
        raise ValueError(f"a point fills 1 to {cfg.layers} layers of {cfg.name}, not {layers}")
    return range(layers)


def check_vmm(arena: KVArena, k: torch.Tensor, before: int, expected: int) -> dict[str, Any]:
    """Raise unless ``k`` lies in the arena's reservation and exactly the expected
    chunks were mapped, on demand, into a reservation that started empty."""
    vt = arena.vt
    inside = vt.va <= k.data_ptr() < vt.va + vt.nbytes
    if before != 0 or vt.mapped_chunks != expected or not inside:
        raise RuntimeError(
            f"KV arena is not VMM-mapped as expected: {before} chunks mapped at start, "
            f"{vt.mapped_chunks} after (expected {expected}); view in reservation: {inside}"
        )
    return {
        "arena": "vmm",
        "chunks_mapped_before": before,
        "chunks_mapped": vt.mapped_chunks,
        "mapped_bytes": vt.mapped_bytes,
        "reserved_bytes": vt.nbytes,
        "slot_tokens": arena.layout.max_tokens,
    }


def fill_rows(k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, tokens: int) -> None:
    """Random K/V in each request's rows only: the rest of a VMM view is not mapped."""
    step = 1 << 16
    for s in starts.tolist():
        for t in (k, v):
            for r in range(s, s + tokens, step):
                t[r : min(r + step, s + tokens)].normal_()
