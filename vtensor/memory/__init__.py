"""vtensor.memory: virtual tensors over CUDA VMM or host virtual memory.

This layer has no model knowledge. Build a backend, a pool of physical chunks
over it, and virtual tensors that map chunks on demand::

    backend = open_backend("host")          # or "cuda"
    pool = ChunkPool(backend, capacity_bytes=1 << 30)
    vt = VirtualTensor(pool, nbytes=64 << 30)  # reserves address space only
    vt.ensure_mapped(0, 8 << 20)               # backs the first 8 MiB
    x = vt.view(torch.float16, (4096, 1024))   # zero-copy torch view

On CUDA, ``open_backend("cuda", location="host")`` gives chunks in host memory that
map into the same ranges (``vt.map(offset, n, pool=host_pool)``): the device reads
them over the bus (heterogeneous mapping; ``cuda_location.py``).
"""

from __future__ import annotations

from .backend import PhysicalBackend, PhysicalChunk
from .errors import (
    ClosedError,
    CudaDriverError,
    HostLocationUnsupportedError,
    MapperError,
    MappingError,
    NoCudaDriverError,
    NotMappedError,
    OutOfRangeError,
    OverlapError,
    PoolExhaustedError,
    VTensorMemoryError,
)
from .mapper import (
    AsyncMapper,
    EnsureMapped,
    Map,
    MapperOp,
    MapperStats,
    MapShared,
    MapTicket,
    Trim,
    Unmap,
    Warm,
)
from .pinned import HostBuffer, HostMemoryStats, PinnedHostMemory
from .pool import ChunkPool, PoolStats
from .virtual import VirtualTensor

BACKENDS = ("host", "cuda")


def open_backend(
    name: str,
    *,
    chunk_size: int | None = None,
    device: int = 0,
    location: str | None = None,
    numa_id: int | None = None,
) -> PhysicalBackend:
    """Build a physical backend by name: ``"host"`` (memfd/mmap) or ``"cuda"`` (VMM).

    ``chunk_size`` applies to the host backend only; CUDA uses the device's
    allocation granularity (2 MiB on the H100). ``location`` (``"device"``, the
    default, or ``"host"``) and ``numa_id`` apply to the CUDA backend only.
    """
    if name == "host":
        from .host import HostBackend

        if location is not None or numa_id is not None:
            raise ValueError(
                "location/numa_id apply to the 'cuda' backend only: the host backend's "
                "chunks are host memory standing in for device memory, with no device to "
                f"read them over a bus (got location={location!r}, numa_id={numa_id!r})"
            )
        return HostBackend(chunk_size or 2 << 20)
    if name == "cuda":
        from .cuda import CudaBackend

        return CudaBackend(device, location=location or "device", numa_id=numa_id)
    raise ValueError(f"unknown memory backend {name!r}; choose from {BACKENDS}")


__all__ = [
    "BACKENDS",
    "AsyncMapper",
    "ChunkPool",
    "ClosedError",
    "CudaDriverError",
    "EnsureMapped",
    "HostBuffer",
    "HostLocationUnsupportedError",
    "HostMemoryStats",
    "Map",
    "MapShared",
    "MapTicket",
    "MapperError",
    "MapperOp",
    "MapperStats",
    "MappingError",
    "NoCudaDriverError",
    "NotMappedError",
    "OutOfRangeError",
    "OverlapError",
    "PhysicalBackend",
    "PhysicalChunk",
    "PinnedHostMemory",
    "PoolExhaustedError",
    "PoolStats",
    "Trim",
    "Unmap",
    "VTensorMemoryError",
    "VirtualTensor",
    "Warm",
    "open_backend",
]
