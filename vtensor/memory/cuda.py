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
from .errors import CudaDriverError, NoCudaDriverError


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError as exc:  # pragma: no cover - cuda-bindings is a dependency
        raise NoCudaDriverError("cuda-bindings is not installed") from exc
    return driver


def _check(call: str, result: tuple[Any, ...]) -> Any:
    """Unpack a ``cuda.bindings`` ``(err, *values)`` tuple, raising on error."""
    err, *values = result
    if int(err) != 0:
        raise CudaDriverError(call, err)
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


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
    """

    name = "cuda"

    def __init__(self, device: int = 0) -> None:
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
        access = cu.CUmemAccessDesc()
        access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = device
        access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self._cid_lock = threading.Lock()
        self._next_cid = 0
        self._closed = False

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

    def reserve(self, nbytes: int) -> int:
        ptr = _check("cuMemAddressReserve", self._cu.cuMemAddressReserve(nbytes, 0, 0, 0))
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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _check("cuDevicePrimaryCtxRelease", self._cu.cuDevicePrimaryCtxRelease(self._dev))
