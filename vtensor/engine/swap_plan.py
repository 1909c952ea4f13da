"""The scheduler's side of swapping: decide, reserve host slots, plan the copies.

Torch-free. At a preemption the scheduler asks :class:`SwapPlanner` whether the
victim is swapped (its private chunks copied to the host tier) or recomputed.
The planner asks the cost model (``kvcache/swap_policy.py``) and the host tier
(``kvcache/host_tier.py``); a full tier degrades to recompute with a log line.
The plans it returns travel in the :class:`SchedulerOutput`; the engine carries
out the copies (``engine/swap.py``) before it applies the step's KV commands
(copy-out: the unmaps follow) or before the forward pass (copy-in: the maps
precede).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from vtensor.kvcache import swap_chunks
from vtensor.kvcache.host_tier import HostExtent, HostTier
from vtensor.kvcache.manager import KVCacheManager
from vtensor.kvcache.swap_policy import SwapCostModel

from .request import Request

log = logging.getLogger("vtensor.engine.swap")


@dataclass(frozen=True)
class SwapPlan:
    """Copy ``req``'s chunks ``[extent.first, extent.first + extent.count)`` of arena
    ``slot`` to (swap-out) or from (swap-in) the host slots of ``extent``."""

    req: Request
    slot: int
    extent: HostExtent


@dataclass
class SwapDecisions:
    swaps: int = 0
    recomputes: int = 0  # the cost model chose recompute
    tier_full: int = 0  # swap chosen, but the host tier had no room
    dropped: int = 0  # swapped, then recomputed after all (the pool could not take it back)


class SwapPlanner:
    def __init__(self, tier: HostTier, cost: SwapCostModel, chunk_size: int) -> None:
        self.tier = tier
        self.cost = cost
        self.chunk_size = chunk_size
        self.decisions = SwapDecisions()

    def swap_out(self, kv: KVCacheManager, req: Request, force: bool = False) -> SwapPlan | None:
        """Swap ``req`` (running, its blocks already offered to the cache) out: its
        private chunks leave the GPU once copied; None: recompute it instead (nothing
        changed). ``force``: swap whatever the cost model says (an SLO swap-out, whose
        victim must keep its progress; ``slo_admission.py`` checked the tier has room)."""
        if req.num_computed == 0 or req.num_tokens >= req.max_len:
            return None  # nothing computed, or only its last token is awaited
        first, end = swap_chunks.private_tail(kv, req.rid, req.num_computed)
        decision = self.cost.decide((end - first) * self.chunk_size, req.num_computed)
        if force:
            decision = replace(decision, swap=True, reason="SLO-aware admission")
        if not decision.swap:
            self.decisions.recomputes += 1
            log.info("request %d: recompute (%s)", req.rid, decision.reason)
            return None
        usage = self.tier.usage()
        if usage.capacity_slots - usage.used_slots < end - first:
            kv.cache.free_host(end - first)  # a running request before spilled prefixes
        extent = self.tier.begin_out(req.rid, first, end - first)
        if extent is None:
            self.decisions.tier_full += 1
            log.warning(
                "request %d: host KV tier full (%d of %d chunks free), recompute instead",
                req.rid,
                self.tier.usage().capacity_slots - self.tier.usage().used_slots,
                end - first,
            )
            return None
        self.decisions.swaps += 1
        log.info("request %d: swap out %d chunk(s) (%s)", req.rid, end - first, decision.reason)
        slot = kv.slots.slot_of(req.rid)
        swap_chunks.swap_out(kv, req.rid, first)
        return SwapPlan(req, slot, extent)

    def swap_in(
        self, kv: KVCacheManager, req: Request, tokens: int, headroom: int
    ) -> SwapPlan | None:
        """Map fresh chunks for swapped ``req`` up to ``tokens``; None: no room yet."""
        if not swap_chunks.swap_in(kv, req.rid, tokens, headroom):
            return None
        return SwapPlan(req, kv.slots.slot_of(req.rid), self.tier.begin_in(req.rid))

    def drop(self, req: Request) -> None:
        """An aborted swapped request: its host slots come back (no copy is in flight:
        copy-outs complete before the step that planned them runs, copy-ins before any
        later copy on the one copy stream)."""
        self.tier.drop(req.rid)
