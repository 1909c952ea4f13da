"""The engine's gauges and counters for ``/metrics``: ``(name, help, value)`` rows read
from ``EngineStats`` and ``MemoryStats``, which ``ServerMetrics`` renders (``metrics.py``)."""

from __future__ import annotations

from vtensor.engine.memory_stats import MemoryStats
from vtensor.engine.stats import EngineStats

Row = tuple[str, str, float]  # a metric's name (without the ``vtensor_`` prefix), help, value


def engine_metrics(
    stats: EngineStats, rate: float, rate_window_s: float, memory: MemoryStats | None
) -> tuple[list[Row], list[Row]]:
    """Every engine gauge and counter, in exposition order: the engine's own, the host
    tier's, the SLOs', then the held bytes (and the unified pool's) when ``memory`` is
    given. ``rate`` is the server's tokens/s over ``rate_window_s``."""
    gauges = _core_gauges(stats, rate, rate_window_s)
    counters = _core_counters(stats)
    swap_gauges, swap_counters = _swap_metrics(stats)
    slo_gauges, slo_counters = _slo_metrics(stats)
    gauges += swap_gauges + slo_gauges + (_memory_gauges(memory) if memory is not None else [])
    counters += swap_counters + slo_counters
    if memory is not None and memory.unified_budget_bytes is not None:
        unified_gauges, unified_counters = _unified_metrics(memory)
        gauges += unified_gauges
        counters += unified_counters
    return gauges, counters


def _core_gauges(stats: EngineStats, rate: float, rate_window_s: float) -> list[Row]:
    """The batch, the KV pool and the prefix cache, now."""
    capacity, in_use = stats.pool_capacity_chunks, stats.pool_in_use_chunks
    gauges: list[Row] = [
        ("requests_running", "Requests in the running batch", stats.running),
        ("requests_waiting", "Requests queued for admission", stats.waiting),
        ("kv_chunks_in_use", "Physical KV chunks taken from the pool", in_use),
        ("kv_chunks_free", "Physical KV chunks still available", capacity - in_use),
        ("kv_chunks_capacity", "Physical KV chunks the pool can hold", capacity),
        # Deferred reclamation keeps finished requests' chunks mapped (counted in use);
        # they are handed to new requests on demand, so they are not lost capacity.
        (
            "kv_chunks_idle",
            "In-use chunks held by idle slots, reclaimable on demand",
            stats.idle_kv_bytes // stats.chunk_size,
        ),
        ("kv_chunk_bytes", "Bytes per KV chunk", stats.chunk_size),
        ("kv_mapped_bytes", "KV bytes mapped to running requests", stats.mapped_kv_bytes),
        ("kv_live_bytes", "KV bytes holding running requests' tokens", stats.live_kv_bytes),
        ("kv_idle_bytes", "KV bytes kept by idle slots for reuse", stats.idle_kv_bytes),
        ("generation_tokens_per_second", f"Tokens/s over {rate_window_s:.0f}s", rate),
        ("prefix_cache_hit_rate", "Prompt tokens served by the prefix cache, of those "
         "queried, since start", stats.prefix_cache_hit_rate),
        ("prefix_cache_chunks", "Physical KV chunks the prefix cache holds",
         stats.prefix_cache_chunks),
        ("prefix_cache_bytes", "KV bytes the prefix cache holds", stats.prefix_cache_bytes),
    ]  # fmt: skip
    return gauges


def _core_counters(stats: EngineStats) -> list[Row]:
    """Preemptions, steps, mapping time and the prefix cache and computed tokens, since start."""
    counters: list[Row] = [
        ("preemptions_total", "Requests preempted for KV memory", stats.preemptions),
        ("engine_steps_total", "Engine steps run", stats.steps),
        ("mapper_wait_seconds_total", "Time steps blocked on KV mapping", stats.mapper_wait_s),
        ("kv_sync_seconds_total", "Queue-to-ready time of KV mapping", stats.kv_sync_s),
        ("kv_fence_seconds_total", "Of the KV sync time, waits for steps still on the GPU "
         "before unmapping slots they touch", stats.kv_fence_s),
        ("unmap_fences_total", "Steps whose unmaps waited for a step on the GPU",
         stats.unmap_fences),
        ("kv_hook_seconds_total", "Of the KV sync time, hooks between command segments "
         "(prefix spill copy-outs)", stats.kv_hook_s),
        ("mapper_busy_seconds_total", "Time the mapper thread spent applying map and "
         "unmap ops", stats.mapper_busy_s),
        ("prefix_cache_queries_total", "Prompt tokens of admitted requests, looked up in "
         "the prefix cache", stats.prefix_cache_queries),
        ("prefix_cache_hits_total", "Of those, tokens whose KV the prefix cache served",
         stats.prefix_cache_hits),
        ("prefix_cache_gpu_hits_total", "Of the hits, tokens whose KV was on the GPU",
         stats.prefix_cache_gpu_hits),
        ("prefix_cache_host_hits_total", "Of the hits, tokens whose KV was restored from "
         "the host tier (spilled blocks)", stats.prefix_cache_host_hits),
        ("prefix_cache_evicted_chunks_total", "KV chunks freed by evicting cached blocks",
         stats.prefix_cache_evicted_chunks),
        ("computed_tokens_total", "Tokens computed by the steps (prefill and decode)",
         stats.computed_tokens),
        ("prefill_tokens_total", "Of those, tokens computed by prefill spans (cache hits "
         "excluded; re-prefills after a preemption by recompute included)",
         stats.prefill_tokens),
        ("recomputed_prompt_tokens_total", "Of those, tokens computed again after a "
         "preemption by recompute (their KV had been computed before)",
         stats.recomputed_prompt_tokens),
    ]  # fmt: skip
    return counters


def _swap_metrics(
    stats: EngineStats,
) -> tuple[list[tuple[str, str, float]], list[tuple[str, str, float]]]:
    """The host KV tier's gauges and counters (``--swap-space``; capacity 0 when off)."""
    gauges: list[tuple[str, str, float]] = [
        ("requests_swapped", "Requests whose KV is in the host tier", stats.swapped),
        ("host_tier_chunks_in_use", "Host KV tier chunks in use (swapped KV and spilled blocks)",
         stats.host_tier_used_chunks),
        ("host_tier_chunks_capacity", "Host KV tier chunks (--swap-space)",
         stats.host_tier_capacity_chunks),
        ("host_tier_spilled_chunks", "Host KV tier chunks holding spilled prefix-cache "
         "blocks", stats.host_tier_spilled_chunks),
        ("prefix_cache_host_blocks", "Prefix-cache blocks on the host tier",
         stats.prefix_cache_host_blocks),
    ]  # fmt: skip
    counters: list[tuple[str, str, float]] = [
        ("swap_out_bytes_total", "KV bytes copied to the host tier", stats.swap_out_bytes),
        ("swap_in_bytes_total", "KV bytes copied back from the host tier", stats.swap_in_bytes),
        ("swap_out_seconds_total", "Time copying KV to the host tier", stats.swap_out_s),
        ("swap_in_seconds_total", "Time copying KV back from the host tier", stats.swap_in_s),
        ("swap_preemptions_total", "Preemptions that swapped instead of recomputing",
         stats.swap_preemptions),
        ("swap_tier_full_total", "Swaps refused by a full host tier (recomputed)",
         stats.swap_tier_full),
        ("prefix_cache_spilled_blocks_total", "Evicted prefix-cache blocks spilled to the "
         "host tier", stats.prefix_cache_spilled_blocks),
        ("prefix_cache_restored_blocks_total", "Spilled prefix-cache blocks copied back "
         "for a hit", stats.prefix_cache_restored_blocks),
        ("spill_out_bytes_total", "KV bytes of spilled prefix-cache blocks copied to the "
         "host tier", stats.spill_out_bytes),
        ("spill_stage_wait_seconds_total", "Of the hook time, waits for the mapper to map "
         "spilled blocks where their copy reads them", stats.spill_stage_wait_s),
        ("spill_in_bytes_total", "KV bytes of spilled prefix-cache blocks copied back",
         stats.spill_in_bytes),
    ]  # fmt: skip
    return gauges, counters


def _slo_metrics(
    stats: EngineStats,
) -> tuple[list[tuple[str, str, float]], list[tuple[str, str, float]]]:
    """SLO attainment and SLO swap-outs (``--ttft-slo-ms`` / ``--tpot-slo-ms``; 0 when off)."""
    gauges: list[tuple[str, str, float]] = [
        ("slo_ttft_attainment", "Finished requests that met the TTFT SLO, of those with one",
         stats.slo_ttft_attainment),
        ("slo_tpot_attainment", "Finished requests that met the TPOT SLO, of those with one "
         "and 2+ tokens", stats.slo_tpot_attainment),
    ]  # fmt: skip
    counters: list[tuple[str, str, float]] = [
        ("slo_ttft_requests_total", "Finished requests with a TTFT SLO and a first token",
         stats.slo_ttft_requests),
        ("slo_ttft_met_total", "Of those, the ones whose first token met the SLO",
         stats.slo_ttft_met),
        ("slo_tpot_requests_total", "Finished requests with a TPOT SLO and 2+ tokens",
         stats.slo_tpot_requests),
        ("slo_tpot_met_total", "Of those, the ones whose time per output token met the SLO",
         stats.slo_tpot_met),
        ("slo_swap_outs_total", "Running requests swapped out to admit one about to miss "
         "its TTFT SLO", stats.slo_swap_outs),
        ("slo_swaps_refused_total", "SLO swap-outs refused for lack of host tier room",
         stats.slo_swaps_refused),
    ]  # fmt: skip
    return gauges, counters


def _memory_gauges(m: MemoryStats) -> list[tuple[str, str, float]]:
    """The bytes the engine holds, by class (``engine/memory_stats.py``)."""
    gauges: list[tuple[str, str, float]] = [
        ("memory_kv_held_bytes", "KV chunks created and not released to the driver",
         m.kv_held_bytes),
        ("memory_kv_live_bytes", "KV chunks mapped by running requests (not cached)",
         m.kv_live_bytes),
        ("memory_kv_prefix_cached_bytes", "KV chunks held by the prefix cache",
         m.kv_prefix_cached_bytes),
        ("memory_kv_idle_bytes", "KV chunks only idle slots map (bounded reclamation)",
         m.kv_idle_bytes),
        ("memory_kv_free_in_pool_bytes", "KV chunks free in the pool, not yet released",
         m.kv_free_in_pool_bytes),
        ("memory_kv_scratch_bytes", "KV chunks of the scratch slot", m.kv_scratch_bytes),
        ("memory_kv_chunks_released", "KV chunks released to the driver since start",
         m.kv_released_chunks),
        ("memory_weights_bytes", "Model weights on this device (rank 0)", m.weights_bytes),
    ]  # fmt: skip
    if m.workspace_bytes is not None:
        gauges.append(("memory_workspace_bytes", "Torch allocator reserve beyond the weights",
                       m.workspace_bytes))  # fmt: skip
    return gauges


def _unified_metrics(m: MemoryStats) -> tuple[list[tuple[str, str, float]], ...]:
    """The unified pool's gauges and counters (``--unified-memory-pool``)."""
    gauges: list[tuple[str, str, float]] = [
        ("memory_unified_budget_bytes", "One budget for KV and workspace",
         m.unified_budget_bytes or 0),
        ("memory_workspace_reserve_bytes", "Workspace reserved for the step planned last",
         m.workspace_reserve_bytes or 0),
        ("memory_kv_borrowed_bytes", "KV in use beyond the static split's share",
         m.kv_borrowed_bytes or 0),
        ("memory_workspace_pool_bytes", "The pool-backed workspace's chunks (CUDA)",
         m.workspace_pool_bytes or 0),
    ]  # fmt: skip
    counters: list[tuple[str, str, float]] = [
        ("kv_inflates_total", "Steps whose KV share grew", m.kv_inflates),
        ("kv_deflates_total", "Steps whose KV share shrank", m.kv_deflates),
        ("deflate_idle_bytes_total", "Idle KV reclaimed for the workspace",
         m.deflate_idle_bytes),
        ("deflate_cached_bytes_total", "Prefix-cached KV evicted for the workspace",
         m.deflate_cached_bytes),
        ("deflate_preemptions_total", "Requests preempted for the workspace",
         m.deflate_preemptions),
    ]  # fmt: skip
    return gauges, counters
