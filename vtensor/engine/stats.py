"""EngineStats: what the engine reports about its requests, steps and KV memory."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from vtensor.kvcache.arena import KVArena
from vtensor.kvcache.manager import KVCacheManager
from vtensor.memory import ChunkPool

from .scheduler import Scheduler

if TYPE_CHECKING:
    from .slo_admission import SLOAdmission
    from .swap_driver import SwapDriver


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
    # Parts of kv_sync_s: the unmap fences' waits for the GPU, and the hooks between a
    # step's command segments (a prefix spill's copy-out: staging maps and the copy's
    # queueing). The rest is queueing commands and waiting for the step's maps.
    kv_fence_s: float
    kv_hook_s: float
    mapper_busy_s: float  # time the mapper thread spent applying ops
    live_kv_bytes: int  # KV of running requests' computed tokens (shared ones per request)
    mapped_kv_bytes: int  # chunks mapped to running slots (a shared chunk once per slot)
    idle_kv_bytes: int  # chunks kept by idle slots (deferred reclamation)
    surplus_kv_bytes: int  # running slots' chunks inherited beyond their needs (ditto)
    chunk_size: int
    pool_in_use_chunks: int
    pool_free_chunks: int
    pool_capacity_chunks: int
    prefix_caching: bool = False
    prefix_cache_queries: int = 0  # prompt tokens of admitted requests
    prefix_cache_hits: int = 0  # of which the prefix cache served the KV (GPU + host)
    prefix_cache_host_hits: int = 0  # of those, restored from the host tier (spilled)
    prefix_cache_chunks: int = 0  # chunks the prefix cache holds now
    prefix_cache_blocks: int = 0
    prefix_cache_evicted_chunks: int = 0  # freed by evicting cache blocks
    swapped: int = 0  # requests whose KV is in the host tier
    swap_out_bytes: int = 0
    swap_in_bytes: int = 0
    swap_out_s: float = 0.0
    swap_in_s: float = 0.0
    host_tier_used_chunks: int = 0
    host_tier_capacity_chunks: int = 0  # 0: no host tier (swap_space_bytes 0)
    swap_preemptions: int = 0  # preemptions that swapped (the rest recomputed)
    swap_tier_full: int = 0  # swaps the cost model chose that a full host tier refused
    swap_dropped: int = 0  # swapped requests recomputed after all (SwappedQueue.resume)
    # SLO-aware admission (ttft_slo_ms / tpot_slo_ms; all 0 when off). Finished requests
    # (stop or length) with a first token / with 2+ tokens, and of those the ones that met it.
    slo_ttft_requests: int = 0
    slo_ttft_met: int = 0
    slo_tpot_requests: int = 0
    slo_tpot_met: int = 0
    slo_swap_outs: int = 0  # running requests swapped out to admit one about to miss its TTFT
    slo_swaps_refused: int = 0  # such swap-outs a missing or full host tier refused

    # Prefix-cache spill (on with the cache and a host tier; its copies are not in swap_*).
    spill_out_bytes: int = 0
    spill_in_bytes: int = 0
    spill_out_s: float = 0.0
    spill_in_s: float = 0.0
    spill_stage_wait_s: float = 0.0  # host time waiting for the staging maps of copy-outs
    host_tier_spilled_chunks: int = 0  # host tier chunks held by spilled cache blocks
    prefix_cache_host_blocks: int = 0  # cache blocks on the host now
    prefix_cache_spilled_blocks: int = 0  # evicted blocks spilled to the host, since start
    prefix_cache_restored_blocks: int = 0  # host blocks copied back for a hit, since start

    # Tokens computed, since start: every span's (computed_tokens); of those, prefill
    # spans' (prefill_tokens: prompts, their chunks and the re-prefills after a
    # preemption by recompute, prefix-cache hits excluded; the rest are decode tokens);
    # of those, tokens whose KV had been computed before a preemption by recompute (or
    # a swap dropped) and was computed again (recomputed_prompt_tokens: the waste a
    # swap avoids; the re-prefill covers the tokens generated before, too).
    computed_tokens: int = 0
    prefill_tokens: int = 0
    recomputed_prompt_tokens: int = 0

    @property
    def slo_ttft_attainment(self) -> float:
        """TTFT met over finished requests with a TTFT SLO (0 before any)."""
        return self.slo_ttft_met / self.slo_ttft_requests if self.slo_ttft_requests else 0.0

    @property
    def slo_tpot_attainment(self) -> float:
        """TPOT met over finished requests with a TPOT SLO and 2+ tokens (0 before any)."""
        return self.slo_tpot_met / self.slo_tpot_requests if self.slo_tpot_requests else 0.0

    @property
    def prefix_cache_gpu_hits(self) -> int:
        """Hit tokens whose KV was on the GPU (shared, no copy)."""
        return self.prefix_cache_hits - self.prefix_cache_host_hits

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hit tokens over queried tokens since start (0 before any query)."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    @property
    def prefix_cache_bytes(self) -> int:
        return self.prefix_cache_chunks * self.chunk_size

    @property
    def waste_bytes(self) -> int:
        """Mapped to running slots but holding no KV, excluding the surplus kept on purpose."""
        return self.mapped_kv_bytes - self.surplus_kv_bytes - self.live_kv_bytes


@dataclass
class StepCounters:
    """Running totals the engine keeps as it steps."""

    steps: int = 0
    step_s: float = 0.0
    kv_sync_s: float = 0.0
    unmap_fences: int = 0
    kv_fence_s: float = 0.0  # of kv_sync_s: fences waiting for steps on the GPU
    kv_hook_s: float = 0.0  # of kv_sync_s: hooks between command segments (spill copies)
    computed_tokens: int = 0  # tokens of every span launched (prefill and decode)
    prefill_tokens: int = 0  # of those, in prefill spans (see EngineStats.prefill_tokens)
    recomputed_prompt_tokens: int = 0  # of those, computed again after a recompute
    # The unified pool's workspace cache released before a step (StepExecutor._make_room),
    # by why: the KV needs chunks the cache holds, or the step may outgrow the cache
    # beside the KV; and the host time those releases took (a device sync and the unmaps).
    workspace_releases_for_kv: int = 0
    workspace_releases_for_step: int = 0
    workspace_release_s: float = 0.0


def collect_stats(
    counters: StepCounters,
    scheduler: Scheduler,
    kv: KVCacheManager,
    arena: KVArena,
    pool: ChunkPool,
    swap_driver: SwapDriver | None = None,
    slo: SLOAdmission | None = None,
) -> EngineStats:
    geo, usage = kv.geometry, kv.usage()
    live = sum(s.num_computed for s in scheduler.running) * geo.bytes_per_token
    arena_stats, pool_stats = arena.stats(), pool.stats()
    stats = EngineStats(
        running=len(scheduler.running),
        waiting=len(scheduler.waiting),
        preemptions=scheduler.num_preemptions,
        steps=counters.steps,
        step_s=counters.step_s,
        mapper_wait_s=arena_stats.wait_s,
        mapper_waits=arena_stats.waits,
        kv_sync_s=counters.kv_sync_s,
        unmap_fences=counters.unmap_fences,
        kv_fence_s=counters.kv_fence_s,
        mapper_busy_s=arena_stats.mapper_busy_s,
        kv_hook_s=counters.kv_hook_s,
        computed_tokens=counters.computed_tokens,
        prefill_tokens=counters.prefill_tokens,
        recomputed_prompt_tokens=counters.recomputed_prompt_tokens,
        live_kv_bytes=live,
        mapped_kv_bytes=usage.running_mapped_chunks * geo.chunk_size,
        idle_kv_bytes=usage.idle_chunks * geo.chunk_size,
        surplus_kv_bytes=usage.surplus_chunks * geo.chunk_size,
        chunk_size=geo.chunk_size,
        pool_in_use_chunks=pool_stats.in_use,
        pool_free_chunks=pool_stats.free,
        pool_capacity_chunks=pool_stats.capacity_chunks,
        prefix_caching=kv.cache.enabled,
        prefix_cache_queries=scheduler.prefix_queries,
        prefix_cache_hits=scheduler.prefix_hits,
        prefix_cache_host_hits=scheduler.prefix_host_hits,
        prefix_cache_chunks=usage.cached_chunks,
        prefix_cache_blocks=kv.cache.stats().blocks,
        prefix_cache_evicted_chunks=kv.evicted_chunks,
    )
    if slo is not None:
        stats = _with_slo(stats, slo)
    return stats if swap_driver is None else _with_swap(stats, swap_driver, scheduler)


def _with_slo(stats: EngineStats, slo: SLOAdmission) -> EngineStats:
    """SLO attainment and SLO swap-outs (``ttft_slo_ms`` / ``tpot_slo_ms`` set)."""
    a = slo.attainment
    return replace(
        stats,
        slo_ttft_requests=a.ttft_requests,
        slo_ttft_met=a.ttft_met,
        slo_tpot_requests=a.tpot_requests,
        slo_tpot_met=a.tpot_met,
        slo_swap_outs=slo.swap_outs,
        slo_swaps_refused=slo.refused,
    )


def _with_swap(stats: EngineStats, driver: SwapDriver, scheduler: Scheduler) -> EngineStats:
    """The host KV tier's counters (``swap_space_bytes`` > 0)."""
    swap, tier = driver.stats()
    decisions = driver.planner.decisions
    cache = scheduler.kv.cache.stats()
    spill = driver.swapper.stats(spill=True)
    return replace(
        stats,
        swapped=len(scheduler.swapped),
        swap_out_bytes=swap.out_bytes,
        swap_in_bytes=swap.in_bytes,
        swap_out_s=swap.out_s,
        swap_in_s=swap.in_s,
        host_tier_used_chunks=tier.used_slots,
        host_tier_capacity_chunks=tier.capacity_slots,
        swap_preemptions=decisions.swaps,
        swap_tier_full=decisions.tier_full,
        swap_dropped=decisions.dropped,
        spill_out_bytes=spill.out_bytes,
        spill_in_bytes=spill.in_bytes,
        spill_out_s=spill.out_s,
        spill_in_s=spill.in_s,
        host_tier_spilled_chunks=tier.spill_slots,
        prefix_cache_host_blocks=cache.host_blocks,
        prefix_cache_spilled_blocks=cache.spilled_blocks,
        prefix_cache_restored_blocks=cache.restored_blocks,
    )
