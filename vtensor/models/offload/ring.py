"""WeightRing: the GPU slots offloaded layers stream through, at fixed addresses.

One :class:`VirtualTensor` of ``depth × slot_bytes``, reserved and mapped once
from a pool of its own (CUDA VMM on the GPU, the host backend on the CPU).
Slot ``s`` is bytes ``[s·slot_bytes, (s+1)·slot_bytes)``; offloaded parameters
are views into their layer's slot, so their addresses never change and CUDA
graphs captured over them stay valid while the slot's contents change.
"""

from __future__ import annotations

import torch

from vtensor.memory import ChunkPool, PhysicalBackend, VirtualTensor


class WeightRing:
    def __init__(self, backend: PhysicalBackend, depth: int, slot_bytes: int) -> None:
        """``slot_bytes`` must be a whole number of the backend's chunks."""
        if depth < 1 or slot_bytes <= 0 or slot_bytes % backend.chunk_size:
            raise ValueError(
                f"a ring needs depth >= 1 and slots of whole {backend.chunk_size}-byte "
                f"chunks, got depth {depth}, slot {slot_bytes} bytes"
            )
        self.backend, self.depth, self.slot_bytes = backend, depth, slot_bytes
        self.pool = ChunkPool(backend, depth * slot_bytes)
        try:
            self.vt = VirtualTensor(self.pool, depth * slot_bytes)
            self.vt.map(0, depth * slot_bytes)
        except BaseException:
            self.pool.close()
            raise
        self._bytes = self.vt.view(torch.uint8, (depth * slot_bytes,))

    @property
    def nbytes(self) -> int:
        return self.depth * self.slot_bytes

    def slot(self, s: int) -> torch.Tensor:
        """Slot ``s``'s bytes (a uint8 view, valid until ``close``)."""
        if not 0 <= s < self.depth:
            raise IndexError(f"ring slot {s} of {self.depth}")
        return self._bytes[s * self.slot_bytes : (s + 1) * self.slot_bytes]

    def problems(self) -> list[str]:
        """Broken invariants: every chunk of the ring mapped once, the pool balanced."""
        s = self.pool.stats()
        want = self.nbytes // self.pool.chunk_size
        checks = [
            (s.balanced, f"ring pool does not balance: {s}"),
            (self.vt.closed or self.vt.mapped_chunks == want == s.in_use == s.references,
             f"ring maps {self.vt.mapped_chunks} chunks of {want}; pool {s}"),
        ]  # fmt: skip
        return [what for ok, what in checks if not ok]

    @property
    def closed(self) -> bool:
        return self.pool.closed

    def close(self) -> None:
        """Unmap the ring and release its pool (the backend is the caller's)."""
        if not self.vt.closed:
            self.vt.close()
        if not self.pool.closed:
            self.pool.close()
