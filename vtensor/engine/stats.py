"""EngineStats: what the engine reports about its requests, steps and KV memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    preemptions: int
    steps: int
    step_s: float  # total wall time in step()
    mapper_wait_s: float  # time steps blocked on KV mapping
    mapper_waits: int  # steps that blocked at all
    kv_sync_s: float  # queue-to-ready time of each step's mapping (upper bound on its cost)
    unmap_fences: int  # steps that let the GPU finish the previous step before unmapping
    live_kv_bytes: int  # KV of running requests' computed tokens
    mapped_kv_bytes: int  # chunks committed to running slots
    idle_kv_bytes: int  # chunks kept by idle slots (deferred reclamation)
    surplus_kv_bytes: int  # running slots' chunks inherited beyond their needs (ditto)
    chunk_size: int
    pool_in_use_chunks: int
    pool_free_chunks: int
    pool_capacity_chunks: int

    @property
    def waste_bytes(self) -> int:
        """Mapped to running slots but holding no KV, excluding the surplus kept on purpose."""
        return self.mapped_kv_bytes - self.surplus_kv_bytes - self.live_kv_bytes
