"""KVUsage: a snapshot of the KV manager's chunk counts (engine stats, tests). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manager import KVCacheManager


@dataclass(frozen=True)
class KVUsage:
    running_slots: int
    idle_slots_with_chunks: int
    committed_chunks: int  # physical chunks in use (each counted once, however shared)
    idle_chunks: int  # mappings kept on purpose by idle slots (deferred reclamation)
    surplus_chunks: int  # running slots' mappings beyond what their requests asked for
    capacity_chunks: int
    cached_chunks: int = 0  # chunks the prefix cache holds
    pinned_chunks: int = 0  # chunks no reclaim may take (running requests, locked blocks)
    running_mapped_chunks: int = 0  # mappings of running slots (shared chunks counted per slot)


def kv_usage(kv: KVCacheManager) -> KVUsage:
    tables = kv.books.tables
    owned = kv.slots.owners().values()
    return KVUsage(
        running_slots=len(owned),
        idle_slots_with_chunks=sum(1 for s in kv.slots.idle_slots() if tables[s]),
        committed_chunks=kv.books.committed,
        idle_chunks=kv.slots.idle_chunks,
        surplus_chunks=kv.slots.surplus_chunks,
        capacity_chunks=kv.capacity_chunks,
        cached_chunks=kv.books.cached_count,
        pinned_chunks=kv.books.pinned,
        running_mapped_chunks=sum(len(tables[s]) for s in owned),
    )
