"""Host-located chunks (heterogeneous mapping), on the CPU: the arguments and the clear
errors, the driver probing against a scripted driver built on cuda.bindings' own types,
and virtual tensors holding chunks of two pools (two host backends stand in for the
device- and host-located CUDA ones). ``tests/test_memory_location_gpu.py`` runs the real
thing on a GPU."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from cuda.bindings import driver as real

from vtensor.memory import (
    ChunkPool,
    HostLocationUnsupportedError,
    MappingError,
    NoCudaDriverError,
    PoolExhaustedError,
    VirtualTensor,
    open_backend,
)
from vtensor.memory.cuda_location import (
    ChunkLocation,
    device_access_at,
    host_placement,
    location_at,
)
from vtensor.memory.host import HostBackend

from .conftest import assert_pool_clean

MiB = 1 << 20
OK = real.CUresult.CUDA_SUCCESS
NUMA = "CU_MEM_LOCATION_TYPE_HOST_NUMA"
HOST = "CU_MEM_LOCATION_TYPE_HOST"
NUMA_VMM = "CU_DEVICE_ATTRIBUTE_HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"
HOST_VMM = "CU_DEVICE_ATTRIBUTE_HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "kwargs",
    [
        {"location": "gpu"},
        {"location": "HOST"},
        {"location": "host", "numa_id": -1},
        {"location": "device", "numa_id": 0},
        {"numa_id": 0},
    ],
)
def test_bad_cuda_location_arguments_are_value_errors_on_any_machine(kwargs: Any) -> None:
    """Checked before the driver is touched: the same error with or without a GPU."""
    with pytest.raises(ValueError, match=r"location|numa_id"):
        open_backend("cuda", **kwargs)


@pytest.mark.parametrize("kwargs", [{"location": "host"}, {"location": "device"}, {"numa_id": 0}])
def test_the_host_backend_refuses_a_location(kwargs: Any) -> None:
    with pytest.raises(ValueError, match="'cuda' backend only"):
        open_backend("host", **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_host_location_without_a_gpu_says_no_cuda_driver() -> None:
    with pytest.raises(NoCudaDriverError, match="no CUDA driver"):
        open_backend("cuda", location="host")


# ---------------------------------------------------- probing, scripted driver
class ScriptedDriver:
    """cuda.bindings' real types with scripted calls: a driver whose host-location
    support, device attributes and granularities a test chooses."""

    CUmemAllocationProp = real.CUmemAllocationProp
    CUmemLocationType = real.CUmemLocationType
    CUmemAllocationType = real.CUmemAllocationType
    CUmemAllocationHandleType = real.CUmemAllocationHandleType
    CUmemAllocationGranularity_flags = real.CUmemAllocationGranularity_flags
    CUdevice_attribute = real.CUdevice_attribute
    CUmemLocation = real.CUmemLocation
    CUmemAccess_flags = real.CUmemAccess_flags
    CUdeviceptr = real.CUdeviceptr

    def __init__(
        self, creates: set[str], attrs: dict[str, int], grans: dict[str, int] | None = None
    ) -> None:
        self.creates, self.attrs = creates, attrs
        self.grans = grans or {}
        self.created: list[tuple[int, str, int, int]] = []  # size, type, id, handle types
        self.released: list[int] = []

    def cuDeviceGetAttribute(self, attr: Any, dev: Any) -> tuple[Any, int]:
        if attr.name in self.attrs:
            return OK, self.attrs[attr.name]
        return real.CUresult.CUDA_ERROR_INVALID_VALUE, 0

    def cuMemGetAllocationGranularity(self, prop: Any, flag: Any) -> tuple[Any, int]:
        return OK, self.grans.get(prop.location.type.name, 2 * MiB)

    def cuMemCreate(self, size: int, prop: Any, flags: int) -> tuple[Any, int | None]:
        loc = prop.location.type.name
        if loc not in self.creates:
            return real.CUresult.CUDA_ERROR_NOT_SUPPORTED, None
        self.created.append((size, loc, int(prop.location.id), int(prop.requestedHandleTypes)))
        return OK, len(self.created)

    def cuMemRelease(self, handle: int) -> tuple[Any]:
        self.released.append(handle)
        return (OK,)

    def cuDriverGetVersion(self) -> tuple[Any, int]:
        return OK, 13000


def test_probe_picks_the_devices_numa_node_and_releases_the_probe() -> None:
    cu = ScriptedDriver({NUMA, HOST}, {"CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID": 1, NUMA_VMM: 1})
    p = host_placement(cu, 0, 2 * MiB)
    assert p.location == ChunkLocation(NUMA, 1) and p.location.kind == "host"
    assert p.chunk_size == 2 * MiB
    assert cu.created == [(2 * MiB, NUMA, 1, 0)]  # no IPC handle type: the driver demands 0
    assert cu.released == [1]
    assert p.prop.location.type == real.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST_NUMA
    p0 = host_placement(ScriptedDriver({NUMA}, {"CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID": 1}), 0, 1, 0)
    assert p0.location == ChunkLocation(NUMA, 0)  # numa_id overrides the device's node
    no_numa = ScriptedDriver({NUMA}, {"CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID": -1})
    assert host_placement(no_numa, 0, 2 * MiB).location == ChunkLocation(NUMA, 0)


def test_probe_falls_back_to_plain_host_with_a_chunk_both_granularities_divide() -> None:
    cu = ScriptedDriver({HOST}, {}, grans={HOST: 4 * MiB})  # attributes unknown: probe anyway
    p = host_placement(cu, 0, 2 * MiB)
    assert p.location == ChunkLocation(HOST, 0)
    assert p.chunk_size == math.lcm(4 * MiB, 2 * MiB) == 4 * MiB
    assert [c[1] for c in cu.created] == [HOST] and cu.released == [1]


def test_unsupported_host_location_is_a_clear_error_naming_what_was_tried() -> None:
    refused = ScriptedDriver(set(), {NUMA_VMM: 0, HOST_VMM: 0})
    with pytest.raises(HostLocationUnsupportedError, match="CUDA_ERROR_NOT_SUPPORTED") as info:
        host_placement(refused, 0, 2 * MiB)
    msg = str(info.value)
    assert f"{NUMA_VMM} = 0" in msg and f"{HOST_VMM} = 0" in msg and "driver 13000" in msg
    assert NUMA in msg and HOST in msg
    assert refused.created == [] and refused.released == []  # nothing was left behind
    unknown = ScriptedDriver(set(), {})  # attributes this driver does not know: None
    with pytest.raises(HostLocationUnsupportedError, match=f"{HOST_VMM} = None"):
        host_placement(unknown, 0, 2 * MiB)


def test_the_real_call_decides_not_the_support_attribute() -> None:
    """A device reporting no support, whose driver still creates the chunk: used (the GPU
    probe then checks the bytes); the attribute is only reported on failure."""
    cu = ScriptedDriver({NUMA}, {NUMA_VMM: 0})
    assert host_placement(cu, 0, 2 * MiB).location == ChunkLocation(NUMA, 0)


def test_location_and_access_queries_read_the_driver() -> None:
    class Queries(ScriptedDriver):
        def cuMemRetainAllocationHandle(self, va: int) -> tuple[Any, int]:
            self.asked = va
            return OK, 77

        def cuMemGetAllocationPropertiesFromHandle(self, handle: int) -> tuple[Any, Any]:
            prop = real.CUmemAllocationProp()
            prop.location.type = real.CUmemLocationType.CU_MEM_LOCATION_TYPE_HOST_NUMA
            prop.location.id = 3
            return OK, prop

        def cuMemGetAccess(self, loc: Any, ptr: Any) -> tuple[Any, int]:
            assert loc.type == real.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
            return OK, self.flags

    cu = Queries(set(), {})
    assert location_at(cu, 4096) == ChunkLocation(NUMA, 3) and cu.asked == 4096
    assert cu.released == [77]  # the retained handle goes back
    cu.flags = int(real.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    assert device_access_at(cu, 0, 4096)
    cu.flags = int(real.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READ)
    assert not device_access_at(cu, 0, 4096)


# ------------------------------------------ one virtual range, two pools' chunks
@pytest.fixture
def pools() -> Iterator[tuple[ChunkPool, ChunkPool]]:
    """A 'device' pool and a 'host' pool on two host backends (the CPU stand-in)."""
    dev_b, host_b = HostBackend(), HostBackend()
    dev, host = ChunkPool(dev_b, 16 * dev_b.chunk_size), ChunkPool(host_b, 8 * host_b.chunk_size)
    yield dev, host
    for pool in (dev, host):
        assert_pool_clean(pool)
        pool.close()
    dev_b.close()
    host_b.close()


def test_another_pools_chunks_map_read_write_and_go_back_to_their_pool(
    pools: tuple[ChunkPool, ChunkPool],
) -> None:
    dev, host = pools
    cs = dev.chunk_size
    with VirtualTensor(dev, 8 * cs) as vt, VirtualTensor(host, 2 * cs) as alias:
        assert vt.map(0, 2 * cs, pool=host) == 2  # the cold front: host chunks
        vt.ensure_mapped(0, 6 * cs)  # the rest: ours, around them
        assert [vt.owner(i) is host for i in range(6)] == [True] * 2 + [False] * 4
        assert host.stats().in_use == 2 and dev.stats().in_use == 4
        x = vt.view(torch.float32, (6 * cs // 4,))
        data = torch.randn_like(x)
        x.copy_(data)
        assert torch.equal(x, data)
        # The bytes really are the host pool's chunks: map them again elsewhere and read.
        chunks = [c for _, c in vt.mapped_table()[:2]]
        alias.map_chunks(0, chunks)
        assert torch.equal(alias.view(torch.float32, (2 * cs // 4,)), data[: 2 * cs // 4])
        assert host.stats().references == 4
        with pytest.raises(MappingError, match="another pool"):
            vt.chunks(0, 2 * cs)  # callers retain chunks() on vt.pool: refused
        assert len(vt.chunks(2 * cs, 4 * cs)) == 4
        assert vt.unmap(0, 3 * cs) == 3  # a run of both pools' chunks
        assert host.stats().references == 2 and dev.stats().in_use == 3
        alias.unmap(0, 2 * cs)
        vt.map(0, cs, pool=host)  # close() gives a foreign chunk back to its pool too
    assert host.stats().in_use == 0 and dev.stats().in_use == 0


def test_a_pool_that_cannot_map_here_changes_nothing(pools: tuple[ChunkPool, ChunkPool]) -> None:
    dev, host = pools
    cs = dev.chunk_size
    other = HostBackend(cs * 2)
    wide = ChunkPool(other, 4 * other.chunk_size)
    try:
        with VirtualTensor(dev, 16 * cs) as vt:
            with pytest.raises(ValueError, match="cannot be mapped"):
                vt.map(0, 2 * cs, pool=wide)
            chunk = wide.acquire(1)
            with pytest.raises(ValueError, match="cannot be mapped"):
                vt.map_chunks(0, chunk, pool=wide)
            wide.release(chunk)
            with pytest.raises(PoolExhaustedError):
                vt.map(0, 9 * cs, pool=host)  # the range fits; the host pool (8) does not
            assert vt.mapped_chunks == 0 and host.stats().in_use == 0
            vt.map(cs, cs)
            with pytest.raises(MappingError):  # overlap: refused before any host chunk is taken
                vt.map(0, 2 * cs, pool=host)
            assert host.stats().in_use == 0 and vt.mapped_indices() == [1]
            with pytest.raises(MappingError):
                vt.owner(0)
    finally:
        assert_pool_clean(wide)
        wide.close()
        other.close()
