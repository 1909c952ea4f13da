"""Where a CUDA VMM chunk lives: the device's memory, or host memory it reads over the bus.

``CudaBackend(location="host")`` creates its chunks with ``cuMemCreate`` in host
memory; reserving, mapping and unmapping are the same calls as for device chunks,
and ``cuMemSetAccess`` grants the *device* read/write access to the mapped range.
A kernel then reads such a chunk through the same virtual range as a device chunk,
over PCIe/NVLink-C2C, with no copy (*heterogeneous mapping*, issue 14's experiment).

Driver rules relied on (CUDA driver API, ``cuMemCreate`` / ``cuMemSetAccess``):

* ``CU_MEM_LOCATION_TYPE_HOST_NUMA`` needs ``location.id`` = the host NUMA node
  (0 where the system has no NUMA); ``CU_MEM_LOCATION_TYPE_HOST`` ignores the id;
  ``..._HOST_NUMA_CURRENT`` is refused by ``cuMemCreate``.
* Host allocations are not IPC capable: ``requestedHandleTypes`` must be 0.
* The size must be a multiple of the granularity *of that prop*, which may differ
  from the device's; a chunk size that is a multiple of both maps in either's ranges.
* Every mapping starts with no access; an access descriptor for the device is
  needed whatever the allocation's location.

Drivers older than CUDA 12.2 (or devices without the support) refuse host
locations; :func:`host_placement` probes with a real ``cuMemCreate`` of one chunk
and raises :class:`HostLocationUnsupportedError` listing what it tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .cuda_driver import check
from .errors import CudaDriverError, HostLocationUnsupportedError

LOCATIONS = ("device", "host")
_HOST_NUMA = "CU_MEM_LOCATION_TYPE_HOST_NUMA"
_HOST = "CU_MEM_LOCATION_TYPE_HOST"


@dataclass(frozen=True)
class ChunkLocation:
    """A chunk's physical location as the driver names it: ``type`` is the
    ``CUmemLocationType`` name, ``id`` the device ordinal or the host NUMA node."""

    type: str
    id: int

    @property
    def kind(self) -> str:
        """``"host"`` or ``"device"``."""
        return "host" if self.type.startswith(_HOST) else "device"


@dataclass(frozen=True)
class HostPlacement:
    """A host location this driver creates chunks in: the prop to pass ``cuMemCreate``."""

    prop: Any
    location: ChunkLocation
    chunk_size: int


def check_location(location: str) -> str:
    if location not in LOCATIONS:
        raise ValueError(f"location must be one of {LOCATIONS}, got {location!r}")
    return location


def allocation_prop(cu: Any, type_name: str, loc_id: int) -> Any:
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = getattr(cu.CUmemLocationType, type_name)
    prop.location.id = loc_id
    # Host allocations are not IPC capable: the driver refuses any requested handle type.
    prop.requestedHandleTypes = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_NONE
    return prop


def granularity(cu: Any, prop: Any) -> int:
    flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(check("cuMemGetAllocationGranularity", cu.cuMemGetAllocationGranularity(prop, flag)))


def device_attribute(cu: Any, dev: Any, name: str) -> int | None:
    """A device attribute, or None where this binding or driver does not know it."""
    attr = getattr(cu.CUdevice_attribute, name, None)
    if attr is None:
        return None
    err, value = cu.cuDeviceGetAttribute(attr, dev)
    return int(value) if int(err) == 0 else None


def driver_version(cu: Any) -> int | None:
    err, version = cu.cuDriverGetVersion()
    return int(version) if int(err) == 0 else None


def host_placement(
    cu: Any, dev: Any, device_granularity: int, numa_id: int | None = None
) -> HostPlacement:
    """The first host location this driver creates chunks in: the device's host NUMA
    node (``numa_id`` overrides it; 0 where the device reports none), else plain host
    memory. Each candidate is probed with a real ``cuMemCreate`` + ``cuMemRelease`` of
    one chunk, so an unsupported combination fails here, clearly, not at a later map.
    The real call decides, not the device's support attribute, which the error reports
    (an attribute a driver does not know reads None)."""
    if numa_id is None:
        numa_id = max(0, device_attribute(cu, dev, "CU_DEVICE_ATTRIBUTE_HOST_NUMA_ID") or 0)
    candidates = (
        (_HOST_NUMA, numa_id, "CU_DEVICE_ATTRIBUTE_HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"),
        (_HOST, 0, "CU_DEVICE_ATTRIBUTE_HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED"),
    )
    tried: list[str] = []
    for type_name, loc_id, support in candidates:
        if not hasattr(cu.CUmemLocationType, type_name):
            tried.append(f"{type_name}: not in this cuda-bindings")
            continue
        prop = allocation_prop(cu, type_name, loc_id)
        try:
            size = math.lcm(granularity(cu, prop), device_granularity)
            handle = check("cuMemCreate", cu.cuMemCreate(size, prop, 0))
            check("cuMemRelease", cu.cuMemRelease(handle))
        except CudaDriverError as exc:
            said = device_attribute(cu, dev, support)
            tried.append(f"{type_name}(id={loc_id}): {exc} [{support} = {said}]")
            continue
        return HostPlacement(prop, ChunkLocation(type_name, loc_id), size)
    raise HostLocationUnsupportedError("; ".join(tried) + f" (driver {driver_version(cu)})")


def handle_location(cu: Any, handle: Any) -> ChunkLocation:
    """Where the allocation behind ``handle`` lives, as the driver reports it."""
    prop = check(
        "cuMemGetAllocationPropertiesFromHandle", cu.cuMemGetAllocationPropertiesFromHandle(handle)
    )
    type_name = cu.CUmemLocationType(int(prop.location.type)).name
    return ChunkLocation(type_name, int(prop.location.id))


def location_at(cu: Any, va: int) -> ChunkLocation:
    """Where the chunk mapped at address ``va`` lives: asks the driver by address, not
    our books (``cuMemRetainAllocationHandle``, released again)."""
    handle = check("cuMemRetainAllocationHandle", cu.cuMemRetainAllocationHandle(va))
    try:
        return handle_location(cu, handle)
    finally:
        check("cuMemRelease", cu.cuMemRelease(handle))


def device_access_at(cu: Any, ordinal: int, va: int) -> bool:
    """Whether device ``ordinal`` may read and write the mapping at ``va``."""
    loc = cu.CUmemLocation()
    loc.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    loc.id = ordinal
    flags = check("cuMemGetAccess", cu.cuMemGetAccess(loc, cu.CUdeviceptr(va)))
    rw = int(cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
    return int(flags) == rw
