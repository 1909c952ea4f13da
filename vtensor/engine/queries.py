"""LLMEngine's queries on itself: its stats, its memory by class, its integrity.

Plain functions over the engine; ``LLMEngine.stats``, ``memory_stats`` and
``check_integrity`` call them. Each takes the engine's books lock, so that what it
reads is one consistent state (another engine on a shared KV pool may reclaim
from this one between its steps).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .integrity import check_integrity
from .memory_stats import MemoryStats, collect_memory, with_unified
from .stats import EngineStats, collect_stats
from .tp_driver import talking_to

if TYPE_CHECKING:
    from .llm_engine import LLMEngine


def engine_integrity(engine: LLMEngine) -> None:
    """See ``LLMEngine.check_integrity``."""
    with engine.books_lock:
        with talking_to(engine.workers):
            workers = engine.workers
            reports = workers.reports(engine.parts) if workers is not None else []
        check_integrity(engine, engine.loop.inflight, reports)


def engine_stats(engine: LLMEngine) -> EngineStats:
    """See ``LLMEngine.stats``."""
    e = engine
    with e.books_lock:
        stats = collect_stats(e.counters, e.scheduler, e.kv, e.arena, e.pool, e.swap, e.slo)
    if e.spill is None:
        return stats
    return replace(stats, spill_stage_wait_s=e.spill.counters.stage_wait_s)


def engine_memory_stats(engine: LLMEngine) -> MemoryStats:
    """See ``LLMEngine.memory_stats``."""
    e = engine
    scratch = e.scratch_chunks
    weights = e.weights_bytes if e.weights is None else e.weights.held_bytes()
    with e.books_lock:
        m = collect_memory(e.kv, e.arena, weights, scratch, e.weights is None)
        memory = e.scheduler.memory
        if memory is None:
            return m
        ws = e.runner.workspace
        held = None if ws is None else ws.held_chunks
        return with_unified(m, memory.snapshot(e.kv), memory.counters, held)
