"""The operations the mapper thread applies (``mapper.py``): maps, unmaps, pool
warming and trimming, and the base classes a caller's own ops derive from."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .backend import PhysicalChunk
from .pool import ChunkPool
from .virtual import VirtualTensor


class MapperOp(ABC):
    """One unit of background work. ``apply`` runs on the mapper thread."""

    @abstractmethod
    def apply(self) -> int:
        """Do the work; return the number of chunks it touched (for stats)."""


class DeferredOp(MapperOp):
    """An op that must not run before an outside event (a GPU copy reading the range
    it unmaps), and that later batches need not wait for: see the module contract."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether ``apply`` may run now without waiting (a non-blocking query)."""

    @abstractmethod
    def wait_ready(self) -> None:
        """Block until ``ready`` (the mapper thread calls it when it must run now)."""


@dataclass(frozen=True)
class EnsureMapped(MapperOp):
    """Map fresh chunks into the holes of a range (growth; idempotent)."""

    vt: VirtualTensor
    offset: int
    nbytes: int

    def apply(self) -> int:
        return self.vt.ensure_mapped(self.offset, self.nbytes)


@dataclass(frozen=True)
class Map(MapperOp):
    """Map fresh chunks over a range that must be entirely unmapped."""

    vt: VirtualTensor
    offset: int
    nbytes: int

    def apply(self) -> int:
        return self.vt.map(self.offset, self.nbytes)


@dataclass(frozen=True)
class MapShared(MapperOp):
    """Map chunks that are already in use elsewhere (prefix sharing)."""

    vt: VirtualTensor
    offset: int
    chunks: tuple[PhysicalChunk, ...]

    def apply(self) -> int:
        self.vt.map_chunks(self.offset, self.chunks)
        return len(self.chunks)


@dataclass(frozen=True)
class Unmap(MapperOp):
    vt: VirtualTensor
    offset: int
    nbytes: int

    def apply(self) -> int:
        return self.vt.unmap(self.offset, self.nbytes)


@dataclass(frozen=True)
class Warm(MapperOp):
    """Create chunks ahead of need until ``n_free`` are free."""

    pool: ChunkPool
    n_free: int

    def apply(self) -> int:
        return self.pool.warm(self.n_free)


@dataclass(frozen=True)
class Trim(MapperOp):
    """Release free chunks to the driver, keeping ``keep_free``."""

    pool: ChunkPool
    keep_free: int = 0

    def apply(self) -> int:
        return self.pool.trim(self.keep_free)
