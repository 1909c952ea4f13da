"""The physical backend contract: where chunks of memory come from.

A backend knows nothing about pools, tensors or models. It creates and
releases fixed-size physical chunks, reserves virtual address ranges, and maps
chunks into them. ``ChunkPool`` and ``VirtualTensor`` build everything else on
these seven calls, so a new backend only has to implement this class. (CUDA
host-located chunks are the CUDA backend with ``location="host"``.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PhysicalChunk:
    """One physical chunk of ``chunk_size`` bytes.

    ``cid`` is unique within its backend for the chunk's lifetime; ``handle``
    is the backend's own token (a CUDA allocation handle, a memfd offset).
    """

    cid: int
    handle: object


class PhysicalBackend(ABC):
    """Contract for a source of physical chunks and virtual address space.

    Invariants every implementation keeps:

    * ``chunk_size`` is fixed for the backend's life and is the granularity of
      every size and address passed to ``map``/``unmap``/``set_access``.
    * A chunk may be mapped at any number of chunk-aligned addresses at once;
      all mappings alias the same bytes.
    * ``map`` makes a range *addressable*; it becomes readable/writable only
      after ``set_access`` (CUDA semantics; the host backend mirrors them).
    * ``unmap`` leaves the virtual range reserved, so the address can be
      mapped again; only ``free_reservation`` gives it back.
    * A chunk must not be released while it is still mapped anywhere.
    * Every call either succeeds completely or raises and changes nothing.
    * All calls are thread-safe with respect to distinct ranges; threads other
      than the creating one call ``bind_thread`` once before their first call.
    """

    name: str = "abstract"
    # Where the chunks physically live: "device" (the device's own memory; the host
    # backend's chunks stand in for it) or "host" (host memory the device reads over
    # the bus: CudaBackend(location="host")).
    location: str = "device"

    @property
    @abstractmethod
    def chunk_size(self) -> int:
        """Bytes per physical chunk (the allocation granularity)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The torch device on which views of this backend's memory live."""

    @abstractmethod
    def create_chunk(self) -> PhysicalChunk:
        """Allocate one physical chunk (its contents are undefined)."""

    @abstractmethod
    def release_chunk(self, chunk: PhysicalChunk) -> None:
        """Give an unmapped chunk back to the driver / operating system."""

    @abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (a multiple of ``chunk_size``) of virtual address space."""

    @abstractmethod
    def free_reservation(self, va: int, nbytes: int) -> None:
        """Return a reservation whose ranges are all unmapped."""

    @abstractmethod
    def map(self, va: int, chunk: PhysicalChunk) -> None:
        """Map ``chunk`` at ``va`` (chunk-aligned, inside a reservation, unmapped)."""

    @abstractmethod
    def set_access(self, va: int, nbytes: int) -> None:
        """Make the mapped range ``[va, va+nbytes)`` readable and writable."""

    @abstractmethod
    def unmap(self, va: int, nbytes: int) -> None:
        """Unmap ``[va, va+nbytes)``; each chunk in it must be mapped whole."""

    @abstractmethod
    def byte_view(self, va: int, nbytes: int) -> torch.Tensor:
        """A zero-copy ``uint8`` tensor of ``nbytes`` starting at ``va``.

        The tensor does not keep the memory alive: it is valid only while the
        bytes it touches are mapped with access set.
        """

    def can_map_chunks_of(self, other: PhysicalBackend) -> bool:
        """Whether ``other``'s chunks may be mapped into this backend's reservations
        (``other.map`` at an address this backend reserved, then this backend's
        ``set_access``): a virtual tensor then holds chunks of two pools, say device-
        and host-located ones. By default only a backend's own chunks."""
        return other is self

    def bind_thread(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Prepare the calling thread for backend calls (CUDA: set the context)."""

    def close(self) -> None:  # noqa: B027 - optional hook, default no-op
        """Free backend-wide resources; all chunks and reservations must be gone."""
