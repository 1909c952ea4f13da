"""Builds SLO-aware admission from the engine config (None when no SLO is set)."""

from __future__ import annotations

import logging

from vtensor.kvcache.idle_policy import Clock

from .config import EngineConfig
from .slo_admission import SLOAdmission
from .slo_policy import SLOConfig, SLOPolicy
from .swap_plan import SwapPlanner

log = logging.getLogger("vtensor.engine.slo")


def slo_config(config: EngineConfig) -> SLOConfig:
    """The policy's config, in seconds."""
    ttft, tpot = config.ttft_slo_ms, config.tpot_slo_ms
    return SLOConfig(None if ttft is None else ttft / 1e3, None if tpot is None else tpot / 1e3)


def slo_admission(
    config: EngineConfig, swap: SwapPlanner | None, clock: Clock
) -> SLOAdmission | None:
    if not config.slo_enabled:
        return None
    slo = slo_config(config)
    if swap is None and slo.ttft_slo_s is not None:
        log.warning(
            "SLO-aware admission without a host KV tier (--swap-space 0): waiting requests "
            "are ordered by TTFT slack, but no running request is swapped out for them"
        )
    log.info("SLO-aware admission: TTFT %s ms, TPOT %s ms", config.ttft_slo_ms, config.tpot_slo_ms)
    return SLOAdmission(SLOPolicy(slo), slo, clock, swap)
