"""Prometheus metrics for ``/metrics``, in the text exposition format (no dependency).

Latency histograms are observed on the engine thread and rendered on the HTTP
thread, so every access goes through one lock.
"""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from vtensor.engine.memory_stats import MemoryStats
from vtensor.engine.stats import EngineStats

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0  # the tokens/s gauge averages over this window


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, count in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f"{name}_sum {self.total}", f"{name}_count {self.n}"]
        return lines


class ServerMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.finished: collections.Counter[str] = collections.Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.submitted = 0  # engine requests accepted: each ends as one of `finished`
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def observe_submitted(self, n: int) -> None:
        with self._lock:
            self.submitted += n

    def observe_first_token(self, ttft_s: float) -> None:
        with self._lock:
            self.ttft.observe(ttft_s)

    def observe_finished(
        self,
        reason: str,
        e2e_s: float,
        first: float | None,
        end: float,
        output_tokens: int,
        prompt_tokens: int,
    ) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.e2e.observe(e2e_s)
            self.prompt_tokens += prompt_tokens
            if first is not None and output_tokens > 1:
                # TPOT as the benchmarks define it: decode time over the tokens after the first.
                self.tpot.observe((end - first) / (output_tokens - 1))

    def observe_aborted(self) -> None:
        with self._lock:
            self.finished["abort"] += 1

    def add_tokens(self, n: int, now: float) -> None:
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def tokens_per_s(self, now: float) -> float:
        with self._lock:
            recent = sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
        return recent / RATE_WINDOW_S

    def render(self, stats: EngineStats, now: float, memory: MemoryStats | None = None) -> str:
        """The whole exposition: engine gauges from ``stats`` (and the held bytes from
        ``memory``), then the server's own."""
        rate = self.tokens_per_s(now)
        capacity, in_use = stats.pool_capacity_chunks, stats.pool_in_use_chunks
        gauges = [
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
            ("generation_tokens_per_second", f"Tokens/s over {RATE_WINDOW_S:.0f}s", rate),
            ("prefix_cache_hit_rate", "Prompt tokens served by the prefix cache, of those "
             "queried, since start", stats.prefix_cache_hit_rate),
            ("prefix_cache_chunks", "Physical KV chunks the prefix cache holds",
             stats.prefix_cache_chunks),
            ("prefix_cache_bytes", "KV bytes the prefix cache holds", stats.prefix_cache_bytes),
        ]  # fmt: skip
        counters = [
            ("preemptions_total", "Requests preempted for KV memory", stats.preemptions),
            ("engine_steps_total", "Engine steps run", stats.steps),
            ("mapper_wait_seconds_total", "Time steps blocked on KV mapping", stats.mapper_wait_s),
            ("kv_sync_seconds_total", "Queue-to-ready time of KV mapping", stats.kv_sync_s),
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
        swap_gauges, swap_counters = _swap_metrics(stats)
        slo_gauges, slo_counters = _slo_metrics(stats)
        gauges += swap_gauges + slo_gauges + (_memory_gauges(memory) if memory is not None else [])
        counters += swap_counters + slo_counters
        if memory is not None and memory.unified_budget_bytes is not None:
            unified_gauges, unified_counters = _unified_metrics(memory)
            gauges += unified_gauges
            counters += unified_counters
        lines: list[str] = []
        for name, help_text, value in gauges:
            lines += _scalar(f"vtensor_{name}", help_text, "gauge", value)
        for name, help_text, value in counters:
            lines += _scalar(f"vtensor_{name}", help_text, "counter", value)
        return "\n".join(lines + self._own_lines()) + "\n"

    def _own_lines(self) -> list[str]:
        """What the server observed itself: tokens, finished requests, latency histograms."""
        lines: list[str] = []
        with self._lock:
            lines += _scalar(
                "vtensor_prompt_tokens_total", "Prompt tokens of finished requests",
                "counter", self.prompt_tokens,
            )  # fmt: skip
            lines += _scalar(
                "vtensor_generation_tokens_total", "Tokens generated", "counter",
                self.generation_tokens,
            )  # fmt: skip
            lines += _scalar(
                "vtensor_requests_submitted_total",
                "Requests accepted (each sample of n); each ends in requests_finished_total",
                "counter", self.submitted,
            )  # fmt: skip
            lines += ["# HELP vtensor_requests_finished_total Requests ended, by reason",
                      "# TYPE vtensor_requests_finished_total counter"]  # fmt: skip
            for reason in ("stop", "length", "abort"):
                lines.append(
                    f'vtensor_requests_finished_total{{reason="{reason}"}} {self.finished[reason]}'
                )
            lines += self.ttft.render("vtensor_time_to_first_token_seconds", "Time to first token")
            lines += self.tpot.render(
                "vtensor_time_per_output_token_seconds", "Time per output token after the first"
            )
            lines += self.e2e.render("vtensor_e2e_request_latency_seconds", "Request latency")
        return lines


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


def _scalar(name: str, help_text: str, kind: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
