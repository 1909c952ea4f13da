"""CUDA backend: physical chunks and virtual ranges through the CUDA VMM driver API.

Costs measured on the H100 (NOTES §1): ``cuMemSetAccess`` ~26 µs per 2 MiB
chunk dominates; ``cuMemMap`` ~2-3 µs; ``cuMemUnmap`` ~16 µs. None of them
waits for running kernels, which is why ``AsyncMapper`` can hide them.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from .backend import PhysicalBackend, PhysicalChunk
from .cuda_driver import check as _check
from .cuda_driver import driver as _driver
from .cuda_location import (
    ChunkLocation,
    check_location,
    device_access_at,
    handle_location,
    host_placement,
    location_at,
)
from .errors import CudaDriverError, NoCudaDriverError


class _CudaArray:
    """The smallest object torch.as_tensor accepts as zero-copy device memory."""

    def __init__(self, va: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (va, False),
            "version": 3,
            "strides": None,
        }


class CudaBackend(PhysicalBackend):
    """CUDA VMM implementation of :class:`PhysicalBackend` on one device.

    It shares torch's primary context, so tensors viewed over its ranges work
    with every torch and Triton kernel on that device.

    ``location="host"`` creates the chunks in host memory instead (``cuda_location.py``):
    they map into any CUDA backend's ranges on this device with the same chunk size,
    and the device reads them over the bus. ``numa_id`` picks the host NUMA node
    (default: the device's own). Raises :class:`HostLocationUnsupportedError` where the
    driver cannot create them.
    """

    name = "cuda"

    def __init__(
        self, device: int = 0, location: str = "device", numa_id: int | None = None
    ) -> None:
        # Arguments first: a bad one is a ValueError on every machine, GPU or not.
        check_location(location)
        if numa_id is not None and (location != "host" or numa_id < 0):
            raise ValueError(f"numa_id needs location='host' and a node >= 0, got {numa_id}")
        cu = _driver()
        try:
            _check("cuInit", cu.cuInit(0))
        except CudaDriverError as exc:
            raise NoCudaDriverError(str(exc)) from exc
        except Exception as exc:  # DynamicLibNotFoundError and friends: no libcuda
            raise NoCudaDriverError(type(exc).__name__) from exc
        if not torch.cuda.is_available():
            raise NoCudaDriverError("torch sees no CUDA device")
        if not 0 <= device < torch.cuda.device_count():
            raise ValueError(f"no CUDA device {device}; have {torch.cuda.device_count()}")
        self._cu = cu
        self._ordinal = device
        torch.cuda.init()
        dev = _check("cuDeviceGet", cu.cuDeviceGet(device))
        # torch runs on the primary context; retaining it here gives us the same one.
        self._ctx = _check("cuDevicePrimaryCtxRetain", cu.cuDevicePrimaryCtxRetain(dev))
        self._dev = dev
        try:
            self._setup(cu, device, location, numa_id)
        except BaseException:
            cu.cuDevicePrimaryCtxRelease(dev)
            raise
        self._cid_lock = threading.Lock()
        self._next_cid = 0
        self._closed = False

    def _setup(self, cu: Any, device: int, location: str, numa_id: int | None) -> None:
        self.bind_thread()
        self._prop = cu.CUmemAllocationProp()
        self._prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        self._prop.location.id = device
        flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        gran = _check(
            "cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity(self._prop, flag)
        )
        self._chunk_size = int(gran)
        self.location = location
        self.chunk_location = ChunkLocation("CU_MEM_LOCATION_TYPE_DEVICE", device)
        if location == "host":
            placement = host_placement(cu, self._dev, self._chunk_size, numa_id)
            self._prop, self._chunk_size = placement.prop, placement.chunk_size
            self.chunk_location = placement.location
        # The device gets read/write access whatever the chunks' location: that is what
        # lets a kernel read host-located chunks through the range.
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]

    @property
    def chunk_size(self) -> int:
        return self._chunk_size

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self._ordinal)

    def bind_thread(self) -> None:
        _check("cuCtxSetCurrent", self._cu.cuCtxSetCurrent(self._ctx))

    def create_chunk(self) -> PhysicalChunk:
        handle = _check("cuMemCreate", self._cu.cuMemCreate(self._chunk_size, self._prop, 0))
        with self._cid_lock:
            self._next_cid += 1
            return PhysicalChunk(cid=self._next_cid, handle=handle)

    def release_chunk(self, chunk: PhysicalChunk) -> None:
        _check("cuMemRelease", self._cu.cuMemRelease(chunk.handle))

    def can_map_chunks_of(self, other: PhysicalBackend) -> bool:
        # One device's reservations take either location's chunks of the same size.
        return (
            isinstance(other, CudaBackend)
            and other._ordinal == self._ordinal
            and other.chunk_size == self.chunk_size
        )

    def reserve(self, nbytes: int) -> int:
        # Device chunks keep the driver's default alignment (as always); a host location
        # asks for its chunk size, which may exceed the device's granularity.
        align = self._chunk_size if self.location == "host" else 0
        ptr = _check("cuMemAddressReserve", self._cu.cuMemAddressReserve(nbytes, align, 0, 0))
        return int(ptr)

    def free_reservation(self, va: int, nbytes: int) -> None:
        _check("cuMemAddressFree", self._cu.cuMemAddressFree(self._cu.CUdeviceptr(va), nbytes))

    def map(self, va: int, chunk: PhysicalChunk) -> None:
        ptr = self._cu.CUdeviceptr(va)
        _check("cuMemMap", self._cu.cuMemMap(ptr, self._chunk_size, 0, chunk.handle, 0))

    def set_access(self, va: int, nbytes: int) -> None:
        ptr = self._cu.CUdeviceptr(va)
        _check("cuMemSetAccess", self._cu.cuMemSetAccess(ptr, nbytes, self._access, 1))

    def unmap(self, va: int, nbytes: int) -> None:
        # cuMemUnmap must name whole mappings; unmapping chunk by chunk is always legal.
        cu = self._cu
        for off in range(0, nbytes, self._chunk_size):
            _check("cuMemUnmap", cu.cuMemUnmap(cu.CUdeviceptr(va + off), self._chunk_size))

    def byte_view(self, va: int, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        return torch.as_tensor(_CudaArray(va, nbytes), device=self.device)

    def location_of(self, chunk: PhysicalChunk) -> ChunkLocation:
        """Where ``chunk`` lives, as the driver reports it for its handle."""
        return handle_location(self._cu, chunk.handle)

    def location_at(self, va: int) -> ChunkLocation:
        """Where the chunk mapped at ``va`` lives (asked by address, not our books)."""
        return location_at(self._cu, va)

    def device_can_access(self, va: int) -> bool:
        """Whether this device may read and write the mapping at ``va``."""
        return device_access_at(self._cu, self._ordinal, va)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _check("cuDevicePrimaryCtxRelease", self._cu.cuDevicePrimaryCtxRelease(self._dev))
