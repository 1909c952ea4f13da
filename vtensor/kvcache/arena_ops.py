"""Mapper ops for the prefix cache's references: they run on the mapper thread, in
order with the maps and unmaps around them (``vtensor.memory.mapper``).

The arena keeps ``held``: logical chunk id -> the physical chunk the cache holds a
pool reference to. A hold takes the chunk from where a slot maps it (so it must
run after that map and before any unmap of it, which the command order
guarantees); a cached map shares held chunks into a slot; a drop releases them.
Each op is atomic: on error nothing changed.
"""

from __future__ import annotations

from vtensor.memory import MapperOp, PhysicalChunk, VirtualTensor


class HoldChunks(MapperOp):
    """Take one pool reference to each chunk mapped at ``offset`` onwards."""

    def __init__(
        self, vt: VirtualTensor, offset: int, ids: tuple[int, ...], held: dict[int, PhysicalChunk]
    ) -> None:
        self.vt, self.offset, self.ids, self.held = vt, offset, ids, held

    def apply(self) -> int:
        chunks = self.vt.chunks(self.offset, len(self.ids) * self.vt.chunk_size)
        if any(cid in self.held for cid in self.ids):
            raise RuntimeError(f"chunks {self.ids} are already held by the cache")
        self.vt.pool.retain(chunks)
        self.held.update(zip(self.ids, chunks))
        return len(chunks)

    def __repr__(self) -> str:
        return f"HoldChunks(offset={self.offset}, ids={self.ids})"


class MapHeld(MapperOp):
    """Map held chunks at ``offset`` onwards (``VirtualTensor.map_chunks``: shared)."""

    def __init__(
        self, vt: VirtualTensor, offset: int, ids: tuple[int, ...], held: dict[int, PhysicalChunk]
    ) -> None:
        self.vt, self.offset, self.ids, self.held = vt, offset, ids, held

    def apply(self) -> int:
        self.vt.map_chunks(self.offset, [self.held[cid] for cid in self.ids])
        return len(self.ids)

    def __repr__(self) -> str:
        return f"MapHeld(offset={self.offset}, ids={self.ids})"


class DropChunks(MapperOp):
    """Release the cache's reference to each of ``ids``."""

    def __init__(self, vt: VirtualTensor, ids: tuple[int, ...], held: dict[int, PhysicalChunk]):
        self.vt, self.ids, self.held = vt, ids, held

    def apply(self) -> int:
        chunks = [self.held[cid] for cid in self.ids]  # KeyError: nothing changed
        self.vt.pool.release(chunks)
        for cid in self.ids:
            del self.held[cid]
        return 0

    def __repr__(self) -> str:
        return f"DropChunks(ids={self.ids})"
