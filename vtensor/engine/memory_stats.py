"""MemoryStats: the bytes the engine holds, by what they hold (``LLM.memory_stats()``).

KV chunks are counted from the books once the mapper has applied every queued
command (``arena.wait_all``), so the classes add up to what the pool holds:

    kv_held = scratch + live + prefix_cached + idle + free_in_pool

* **live**: chunks a running request's slot maps (its KV, and chunks mapped
  ahead for it), not held by the prefix cache;
* **prefix_cached**: chunks the prefix cache holds (its own LRU; never "idle",
  even when only idle slots map them);
* **idle**: chunks only idle slots map (deferred reclamation, bounded by the
  watermark and the idle time);
* **free in the pool**: created and unmapped, not yet released to the driver;
* **scratch**: the scratch slot's chunks (CUDA graphs' padding rows), for good.

Weights are the model's state (parameters, persistent buffers) on this rank. Workspace is
what the torch allocator reserves beyond them (activations, CUDA graph pools,
the attention workspace): on CUDA ``torch.cuda.memory_reserved - weights``; on
the CPU there is no allocator to ask, so it is None (unknown), not 0. With sleep mode
the weights are a virtual range of their own, outside torch's reserve: weights are
what that range has mapped (0 while asleep), workspace all of torch's reserve.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.manager import KVCacheManager

if TYPE_CHECKING:
    from .elastic import ElasticCounters, ElasticSnapshot


@dataclass(frozen=True)
class MemoryStats:
    chunk_size: int
    kv_live_bytes: int
    kv_prefix_cached_bytes: int
    kv_idle_bytes: int
    kv_free_in_pool_bytes: int
    kv_scratch_bytes: int
    kv_released_chunks: int  # given back to the driver over the engine's life
    weights_bytes: int
    # torch's reserve less the weights (None: not measurable, CPU). With the unified
    # pool on CUDA, whether torch's reserve counts the pool-backed workspace's segments
    # is not established (an H100 probe saw it grow by 48 MiB for a 12 MiB allocation
    # in the pool): ``workspace_pool_bytes`` gives those chunks apart, and the KV
    # figures leave them out.
    workspace_bytes: int | None
    # The unified pool (``EngineConfig.unified_memory_pool``; None without it): the one
    # budget of KV and workspace, the workspace's reserve for the step planned last, the
    # KV chunks in use beyond the static split's share, and the planner's totals.
    unified_budget_bytes: int | None = None
    workspace_reserve_bytes: int | None = None
    kv_borrowed_bytes: int | None = None
    kv_inflates: int = 0
    kv_deflates: int = 0
    deflate_idle_bytes: int = 0  # idle KV reclaimed for the workspace, over the engine's life
    deflate_cached_bytes: int = 0  # prefix-cached KV evicted for it
    deflate_preemptions: int = 0  # requests that left the GPU for it
    workspace_pool_bytes: int | None = None  # the pool-backed workspace's chunks (CUDA)

    @property
    def kv_held_bytes(self) -> int:
        """Every KV chunk created and not released: the pool's footprint."""
        return (
            self.kv_live_bytes
            + self.kv_prefix_cached_bytes
            + self.kv_idle_bytes
            + self.kv_free_in_pool_bytes
            + self.kv_scratch_bytes
        )

    @property
    def held_bytes(self) -> int:
        """Everything the engine holds on its device (workspace counted as 0 if unknown)."""
        return self.kv_held_bytes + self.weights_bytes + (self.workspace_bytes or 0)


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's state (parameters and persistent buffers: what a checkpoint
    holds), each storage counted once (tied weights). Derived tables (RoPE's, not
    persistent) count as workspace."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # tied weights
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def collect_memory(
    kv: KVCacheManager,
    arena: KVArena,
    weights_bytes: int,
    scratch_chunks: int,
    weights_in_torch: bool = True,
) -> MemoryStats:
    """Wait for the mapper, then count (on the engine's thread: the books are not
    thread-safe). ``weights_in_torch``: the weights are torch allocations (counted in
    its reserve); sleep mode's weights are not (their own virtual range)."""
    arena.wait_all()
    chunk = kv.geometry.chunk_size
    live, idle = kv.books.count_uncached(kv.slots.owners().values())
    pool = arena.pool.stats()
    device = arena.tensor.device
    workspace = None
    if device.type == "cuda":
        workspace = torch.cuda.memory_reserved(device) - (weights_bytes if weights_in_torch else 0)
    return MemoryStats(
        chunk_size=chunk,
        kv_live_bytes=live * chunk,
        kv_prefix_cached_bytes=kv.books.cached_count * chunk,
        kv_idle_bytes=idle * chunk,
        kv_free_in_pool_bytes=pool.free * chunk,
        kv_scratch_bytes=scratch_chunks * chunk,
        kv_released_chunks=pool.released,
        weights_bytes=weights_bytes,
        workspace_bytes=workspace,
    )


def with_unified(
    m: MemoryStats,
    snap: ElasticSnapshot,
    counters: ElasticCounters,
    workspace_chunks: int | None = None,
) -> MemoryStats:
    """``m`` with the unified pool's figures (``engine/elastic.py``); ``workspace_chunks``:
    what the pool-backed workspace holds (CUDA), None without one."""
    chunk = m.chunk_size
    return replace(
        m,
        workspace_pool_bytes=None if workspace_chunks is None else workspace_chunks * chunk,
        unified_budget_bytes=snap.budget * chunk,
        workspace_reserve_bytes=snap.workspace * chunk,
        kv_borrowed_bytes=snap.borrowed * chunk,
        kv_inflates=counters.inflates,
        kv_deflates=counters.deflates,
        deflate_idle_bytes=counters.deflate_idle_chunks * chunk,
        deflate_cached_bytes=counters.deflate_cached_chunks * chunk,
        deflate_preemptions=counters.deflate_preemptions,
    )
