"""WeightRegion: one fixed-address virtual range whose chunks can go and come back.

A model's weights live as views of this range (``models/virtual_weights.py``).
Sleeping gives the physical memory back to the driver while the addresses stay
reserved; waking maps fresh chunks at the same addresses. Anything that
captured those addresses (CUDA graphs, a kernel's cached pointers) stays valid
with no recapture, as long as nothing reads the range while it is released.

States and transitions (``state``)::

    resident --offload(host)--> offloaded --restore()--> resident   (bytes kept in host memory)
    resident --discard()------> discarded --restore()--> resident   (bytes lost: refill them)

Invariants: ``resident`` exactly when every chunk of the range is mapped; in
``offloaded`` and ``discarded`` no chunk is mapped and the region's pool holds
none (all released to the driver: ``cuMemRelease``; on the host backend the
memfd's pages are punched out); a host copy holding the bytes exists exactly in
``offloaded``. Every transition either completes or raises leaving the state as
it was.

``keep_host_buffer``: pinning the host buffer (``cudaHostRegister`` of the
whole model) costs 17-27x the copy itself (5-8 s against 0.3 s for 16 GB on an
H100), so by default the buffer outlives the restore and the next offload
reuses it: only the first sleep pays for pinning. The price is host memory of
the weights' size, held from the first offload until ``close``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from .backend import PhysicalBackend
from .errors import VTensorMemoryError
from .pinned import HostBuffer, PinnedHostMemory
from .pool import ChunkPool
from .virtual import VirtualTensor

COPY_PIECE = 1 << 30  # bytes per copy call: no single copy of a whole model's bytes


class RegionState(Enum):
    RESIDENT = "resident"
    OFFLOADED = "offloaded"  # the bytes wait in host memory
    DISCARDED = "discarded"  # the bytes are gone; the owner refills them after restore


@dataclass(frozen=True)
class RegionStats:
    state: RegionState
    nbytes: int  # the range (whole chunks)
    mapped_bytes: int  # device (or memfd) memory held now
    host_bytes: int  # host memory held now: the copy (offloaded), else a kept buffer


class WeightRegion:
    """A virtual range of ``nbytes`` (rounded up to chunks), mapped at once, over a pool
    of its own on ``backend``; ``host`` holds its bytes while it is offloaded.

    Not thread-safe: one owner (the engine thread) drives the transitions."""

    def __init__(
        self,
        backend: PhysicalBackend,
        nbytes: int,
        host: PinnedHostMemory,
        keep_host_buffer: bool = True,
    ) -> None:
        chunk = backend.chunk_size
        self.nbytes = max(1, math.ceil(nbytes / chunk)) * chunk
        self.backend = backend
        self.host = host
        self.pool = ChunkPool(backend, self.nbytes)
        try:
            self.vt = VirtualTensor(self.pool, self.nbytes)
            try:
                self.vt.map(0, self.nbytes)
            except BaseException:
                self.vt.close()
                raise
        except BaseException:
            self.pool.trim(0)
            self.pool.close()
            raise
        self.state = RegionState.RESIDENT
        self.keep_host_buffer = keep_host_buffer
        self._copy: HostBuffer | None = None  # the bytes, while offloaded
        self._spare: HostBuffer | None = None  # a kept buffer, while resident or discarded

    def view(self, dtype: torch.dtype, shape: tuple[int, ...], offset: int) -> torch.Tensor:
        """A contiguous tensor at byte ``offset``: valid for the region's life, readable
        only while resident."""
        return self.vt.view(dtype, shape, offset=offset)

    def bytes(self) -> torch.Tensor:
        """The whole range as one ``uint8`` tensor (resident only)."""
        return self.vt.view(torch.uint8, (self.nbytes,))

    def offload(self) -> None:
        """Copy the bytes to host memory, then unmap and release every chunk. The caller
        guarantees nothing reads or writes the range meanwhile (synchronize first)."""
        self._require(RegionState.RESIDENT)
        self.backend.bind_thread()  # the engine's thread may not be the creating one
        buf, self._spare = self._spare or self.host.alloc(self.nbytes), None
        try:
            _copy(buf.tensor, self.bytes())
        except BaseException:
            self._drop(buf)
            raise
        self._release()
        self._copy = buf
        self.state = RegionState.OFFLOADED

    def discard(self) -> None:
        """Unmap and release every chunk; the bytes are lost."""
        self._require(RegionState.RESIDENT)
        self.backend.bind_thread()
        self._release()
        self.state = RegionState.DISCARDED

    def restore(self) -> None:
        """Map fresh chunks at the same addresses; an offloaded region gets its bytes back
        and frees the host copy. A discarded one holds undefined bytes: refill them."""
        if self.state is RegionState.RESIDENT:
            raise VTensorMemoryError("the weight region is already resident")
        self.backend.bind_thread()
        self.vt.map(0, self.nbytes)
        if self._copy is not None:
            try:
                _copy(self.bytes(), self._copy.tensor)
            except BaseException:
                self._release()
                raise
            self._drop(self._copy)
            self._copy = None
        self.state = RegionState.RESIDENT

    def stats(self) -> RegionStats:
        host = sum(b.nbytes for b in (self._copy, self._spare) if b is not None)
        return RegionStats(self.state, self.nbytes, self.vt.mapped_bytes, host)

    def problems(self) -> list[str]:
        """Broken invariants (empty when all hold)."""
        s, pool = self.stats(), self.pool.stats()
        out = []
        want = self.nbytes if s.state is RegionState.RESIDENT else 0
        if s.mapped_bytes != want or pool.created * pool.chunk_size != want:
            out.append(f"weight region {s.state.value}: {s.mapped_bytes} bytes mapped, {pool}")
        if (self._copy is not None) != (s.state is RegionState.OFFLOADED):
            out.append(f"weight region {s.state.value} with host copy {self._copy}")
        if self._spare is not None and (self._copy is not None or not self.keep_host_buffer):
            out.append(f"weight region {s.state.value} keeps a spare host buffer {self._spare}")
        return out

    def close(self) -> None:
        """Unmap, release the chunks and the reservation, free the host copy."""
        if not self.vt.closed:
            self.backend.bind_thread()
            self.vt.close()
            self.pool.close()
        for buf in (self._copy, self._spare):
            if buf is not None:
                self.host.free(buf)
        self._copy = self._spare = None

    def _drop(self, buf: HostBuffer) -> None:
        """A host buffer no longer needed: kept for the next offload, or freed."""
        if self.keep_host_buffer:
            self._spare = buf
        else:
            self.host.free(buf)

    def _release(self) -> None:
        self.vt.unmap(0, self.nbytes)
        self.pool.trim(0)

    def _require(self, state: RegionState) -> None:
        if self.state is not state:
            raise VTensorMemoryError(f"the weight region is {self.state.value}, not {state.value}")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A blocking byte copy between host and device (or host and host), in pieces; done
    when it returns (the device is synchronized)."""
    for start in range(0, dst.numel(), COPY_PIECE):
        end = min(start + COPY_PIECE, dst.numel())
        dst[start:end].copy_(src[start:end], non_blocking=True)
    for t in (dst, src):
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
            break
