"""Typed errors of the memory core.

Every operation that raises one of these leaves the pool, the virtual tensors
and the backend exactly as they were before the call (the "strong guarantee").
Tests rely on that: they retry or carry on after catching these.
"""

from __future__ import annotations


class VTensorMemoryError(RuntimeError):
    """Base class of every error raised by ``vtensor.memory``."""


class NoCudaDriverError(VTensorMemoryError):
    """The CUDA backend was asked for on a machine without a usable GPU/driver."""

    def __init__(self, detail: str = "") -> None:
        msg = "no CUDA driver found; use the host backend"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class HostLocationUnsupportedError(VTensorMemoryError):
    """The driver/device cannot create host-located chunks (``CudaBackend(location="host")``)."""

    def __init__(self, tried: str) -> None:
        super().__init__(
            "this CUDA driver/device cannot create host-located VMM chunks (cuMemCreate with "
            f"a host location; needs a driver of CUDA 12.2 or later and a device that supports "
            f"it); tried: {tried}"
        )
        self.tried = tried


class CudaDriverError(VTensorMemoryError):
    """A CUDA driver call returned an error code."""

    def __init__(self, call: str, code: object) -> None:
        super().__init__(f"{call} failed: {code}")
        self.call = call
        self.code = code


class PoolExhaustedError(VTensorMemoryError):
    """The chunk pool cannot supply the requested number of chunks."""

    def __init__(self, requested_bytes: int, available_bytes: int) -> None:
        super().__init__(
            f"chunk pool exhausted: requested {requested_bytes} bytes, "
            f"{available_bytes} bytes available"
        )
        self.requested_bytes = requested_bytes
        self.available_bytes = available_bytes


class MappingError(VTensorMemoryError):
    """Base class of errors about virtual ranges."""


class OutOfRangeError(MappingError, IndexError):
    """A range lies (partly) outside the virtual reservation, or is misaligned."""


class OverlapError(MappingError):
    """A map request overlaps a range that is already mapped."""


class NotMappedError(MappingError):
    """An unmap (or lookup) names a range that is not (fully) mapped."""


class ClosedError(VTensorMemoryError):
    """The object was already closed (double close, or use after close)."""


class MapperError(VTensorMemoryError):
    """The asynchronous mapper is shut down or its worker failed."""
