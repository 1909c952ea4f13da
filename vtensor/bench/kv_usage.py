"""KV memory figures of a throughput run, sampled from ``EngineStats`` after each step.

Three views of the same pool, from the narrowest to the widest:

* **waste** (as before): chunks mapped to running requests that hold no KV, *not*
  counting the surplus chunks a reused slot brought along (kept on purpose);
* **mapped-but-empty**: every byte mapped to running requests minus the bytes their
  tokens fill; surplus, map-ahead and the last chunk's tail all count;
* **held**: every chunk the pool holds, whoever holds it: running requests, idle
  slots (deferred reclamation), the scratch slot and the pool's free list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vtensor.engine.stats import EngineStats

MiB = 1 << 20


@dataclass(frozen=True)
class KVSample:
    running: int
    live_bytes: int  # running requests' computed tokens
    waste_bytes: int  # mapped to running requests, empty, surplus excluded
    empty_bytes: int  # mapped to running requests, empty, surplus included
    idle_bytes: int  # idle slots' chunks
    free_bytes: int  # the pool's free list
    held_bytes: int  # all chunks the pool has created and not released


def kv_sample(st: EngineStats) -> KVSample:
    chunk = st.chunk_size
    return KVSample(
        running=st.running,
        live_bytes=st.live_kv_bytes,
        waste_bytes=st.waste_bytes,
        empty_bytes=st.mapped_kv_bytes - st.live_kv_bytes,
        idle_bytes=st.idle_kv_bytes,
        free_bytes=st.pool_free_chunks * chunk,
        held_bytes=(st.pool_in_use_chunks + st.pool_free_chunks) * chunk,
    )


def summarize(trace: list[KVSample], chunk: int) -> dict[str, Any]:
    """Per-request means and maxima over the steps with requests running, and the
    pool's peak holding with its parts at that step."""
    running = [s for s in trace if s.running]
    waste = [s.waste_bytes / chunk / s.running for s in running]
    empty = [s.empty_bytes / s.running for s in running]
    peak = max(trace, key=lambda s: s.held_bytes, default=None)
    out: dict[str, Any] = {
        "waste_chunks_per_running_mean": sum(waste) / max(1, len(waste)),
        "waste_chunks_per_running_max": max(waste, default=0.0),
        "empty_bytes_per_running_mean": sum(empty) / max(1, len(empty)),
        "empty_bytes_per_running_max": max(empty, default=0.0),
        "held_bytes_max": peak.held_bytes if peak else 0,
        "kept_kv_bytes_max": max((s.idle_bytes + s.empty_bytes - s.waste_bytes for s in trace),
                                 default=0),  # idle + surplus, as before
    }  # fmt: skip
    if peak:
        out["held_at_peak"] = {
            "live": peak.live_bytes,
            "mapped_empty": peak.empty_bytes,
            "idle": peak.idle_bytes,
            "free_in_pool": peak.free_bytes,
            "other": peak.held_bytes
            - peak.live_bytes
            - peak.empty_bytes
            - peak.idle_bytes
            - peak.free_bytes,  # the scratch slot and chunks between owners
        }
    return out
