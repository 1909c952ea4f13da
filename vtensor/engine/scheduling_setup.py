"""Rank 0's scheduling side, wired over its parts: the host KV tier (swap, spill), the
prefix cache, SLO-aware admission and the scheduler that consults them
(``LLMEngine.__init__`` builds it once; ``set_slo`` and ``set_prefix_caching`` swap
two of them between runs)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vtensor.kvcache.host_tier import HostTier
from vtensor.kvcache.idle_policy import Clock
from vtensor.models.config import ModelConfig

from .config import EngineConfig
from .kv_setup import prefix_cache_for
from .scheduler import Scheduler, SchedulerConfig
from .setup import RankParts
from .slo_admission import SLOAdmission
from .slo_setup import slo_admission
from .spill import SpillCopier, spill_copier
from .swap_driver import SwapDriver
from .swap_setup import swap_driver

log = logging.getLogger("vtensor.engine")


@dataclass(frozen=True)
class Scheduling:
    swap: SwapDriver | None  # None: swap off
    spill: SpillCopier | None  # None: prefix-cache spill off
    prefix_caching_note: str | None  # why prefix caching is off (None: on)
    slo: SLOAdmission | None  # None: no SLO
    scheduler: Scheduler


def spill_tier(spill: SpillCopier | None) -> HostTier | None:
    """The host tier the prefix cache spills to (None: spill off)."""
    return None if spill is None else spill.tier


def build_scheduling(
    config: EngineConfig, cfg: ModelConfig, parts: RankParts, clock: Clock, shared_kv: bool
) -> Scheduling:
    """``clock``: the request clock (SLO-aware admission's now); ``shared_kv``: the engine
    draws on a shared KV pool. Sets the prefix cache on ``parts.kv`` (nothing is mapped
    yet: no command to send)."""
    swap = swap_driver(config, cfg, parts.arena, parts.runtime.dtype)
    # Prefix-cache spill: on with the cache and a host tier (not on a shared KV pool,
    # whose reclaims apply their drops outside a step).
    spill = spill_copier(parts.arena, swap, not shared_kv)
    # Rank 0's books alone decide what is cached; the workers only apply its commands.
    cache, note = prefix_cache_for(
        parts.arena.geometry, config.enable_prefix_caching, spill_tier(spill)
    )
    if note and config.enable_prefix_caching:
        log.warning("prefix caching %s", note)
    parts.kv.set_prefix_cache(cache)
    sched = SchedulerConfig(
        config.max_num_seqs, config.max_num_batched_tokens, config.lookahead_tokens
    )
    planner = swap.planner if swap else None
    slo = slo_admission(config, planner, clock)
    return Scheduling(swap, spill, note, slo, Scheduler(sched, parts.kv, planner, slo))
