"""LLMEngine's switches between runs: prefix caching, SLOs, async scheduling, the
request clock.

Benchmarks compare a feature on and off in one process, tests control the clocks.
Each switch is a plain function over the engine it switches; ``LLMEngine``'s methods
of the same names call them. Every switch but the prefix-cache summary and reset
refuses while a request is unfinished, so that no request sees two settings.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from vtensor.kvcache.idle_policy import Clock

from .kv_setup import prefix_cache_for
from .scheduling_setup import spill_tier
from .slo_setup import slo_admission
from .tp_driver import talking_to

if TYPE_CHECKING:
    from .llm_engine import LLMEngine


def prefix_caching_summary(engine: LLMEngine) -> str:
    """One line for logs: on with its block size, or why it is off."""
    cache = engine.kv.cache
    if not cache.enabled:
        return engine.prefix_caching_note or "off"
    return f"on ({cache.block_tokens}-token blocks of {cache.block_chunks} chunk(s))"


def reset_prefix_cache(engine: LLMEngine) -> bool:
    """See ``LLMEngine.reset_prefix_cache``."""
    with engine.books_lock:
        if engine.has_unfinished() or not engine.kv.reset_prefix_cache():
            return False
        with talking_to(engine.workers):  # every rank drops the same references
            engine.loop.settle_if_idle()
    return True


def set_prefix_caching(engine: LLMEngine, on: bool) -> None:
    """See ``LLMEngine.set_prefix_caching``."""
    if engine.has_unfinished():
        raise RuntimeError("prefix caching can only be switched with no request unfinished")
    cache, note = prefix_cache_for(engine.arena.geometry, on, spill_tier(engine.spill))
    if on and note:
        raise ValueError(f"prefix caching is {note}")
    with engine.books_lock:
        engine.kv.set_prefix_cache(cache)
        engine.prefix_caching_note = note
        with talking_to(engine.workers):
            engine.loop.settle_if_idle()


def set_slo(engine: LLMEngine, ttft_slo_ms: float | None, tpot_slo_ms: float | None) -> None:
    """See ``LLMEngine.set_slo``."""
    if engine.has_unfinished():
        raise RuntimeError("SLOs can only be switched with no request unfinished")
    engine.config = replace(engine.config, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms)
    planner = engine.swap.planner if engine.swap else None
    engine.slo = slo_admission(engine.config, planner, engine.request_clock)
    engine.scheduler.admission = engine.slo


def set_async_scheduling(engine: LLMEngine, on: bool) -> None:
    """See ``LLMEngine.set_async_scheduling``."""
    if engine.has_unfinished():
        raise RuntimeError("async scheduling can only be switched with no request unfinished")
    engine.loop.inflight = None  # only finished requests' tokens, dropped unread
    engine.runtime = replace(engine.runtime, async_scheduling=on)


def set_request_clock(engine: LLMEngine, clock: Clock) -> None:
    """See ``LLMEngine.set_request_clock``."""
    if engine.has_unfinished():
        raise RuntimeError("the request clock can only be set with no request unfinished")
    engine.request_clock = clock
    if engine.slo is not None:
        engine.slo.clock = clock
