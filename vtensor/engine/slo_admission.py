"""The scheduler's side of SLO-aware admission (torch-free): it reads the clock once a
step, turns requests and the KV books into the policy's views (``admission_policy.py``),
checks that the host tier can take a plan's victims, remembers which requests were
swapped out for an SLO (the policy spares them a while), and counts SLO attainment.

Built by the engine only when ``ttft_slo_ms`` or ``tpot_slo_ms`` is set; with neither
the scheduler holds none and runs exactly its FCFS code path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from vtensor.kvcache import swap_chunks
from vtensor.kvcache.idle_policy import Clock
from vtensor.kvcache.manager import KVCacheManager

from .admission_policy import AdmissionPolicy, PrefillCostMeter, RoomPlan, RunningView, WaitingView
from .request import Request
from .slo_policy import SLOConfig
from .swap_plan import SwapPlanner

log = logging.getLogger("vtensor.engine.slo")


@dataclass
class SLOAttainment:
    """Finished requests (stop or length; aborts are not counted) that met each SLO."""

    ttft_requests: int = 0  # finished with a TTFT SLO set and a first token
    ttft_met: int = 0
    tpot_requests: int = 0  # finished with a TPOT SLO set and at least 2 tokens
    tpot_met: int = 0

    def observe(self, req: Request, config: SLOConfig) -> None:
        first, last = req.first_token_time, req.last_token_time
        if first is None or last is None:
            return
        if config.ttft_slo_s is not None:
            self.ttft_requests += 1
            self.ttft_met += first - req.arrival <= config.ttft_slo_s
        if config.tpot_slo_s is not None and req.num_output >= 2:
            # TPOT as /metrics defines it: decode time over the tokens after the first.
            self.tpot_requests += 1
            self.tpot_met += (last - first) / (req.num_output - 1) <= config.tpot_slo_s


class SLOAdmission:
    def __init__(
        self, policy: AdmissionPolicy, config: SLOConfig, clock: Clock, swap: SwapPlanner | None
    ) -> None:
        self.policy = policy
        self.config = config
        self.clock = clock
        self.swap = swap  # None: no host tier, so nothing is swapped out for an SLO
        self.meter = PrefillCostMeter()
        self.attainment = SLOAttainment()
        self.step = 0
        self.now = clock()
        self.swap_outs = 0  # requests swapped out for an SLO
        self.refused = 0  # plans that fit but that the host tier could not take
        self._swapped_at: dict[int, int] = {}  # rid -> step of its last SLO swap-out
        self._warned = swap is None  # the engine logged at start that nothing is swapped

    def begin_step(self) -> None:
        """Read the clock: one ``now`` for the whole schedule."""
        self.step += 1
        self.now = self.clock()

    def order(self, waiting: Sequence[Request]) -> list[Request]:
        views = [
            WaitingView(r.rid, r.arrival, r.num_tokens, r.first_token_time is not None)
            for r in waiting
        ]
        return [waiting[i] for i in self.policy.order(views, self.now, self.meter.s_per_token)]

    def waiting_first(self, waiting: Sequence[Request], swapped: Sequence[Request]) -> bool:
        """Admit the waiting head before swapping ``swapped`` back in (the policy's call)?"""
        if not waiting or not swapped:
            return bool(waiting)
        head = waiting[0]
        view = WaitingView(
            head.rid, head.arrival, head.num_tokens, head.first_token_time is not None
        )
        runs = [self._view(r, None) for r in swapped]
        return self.policy.waiting_first(view, runs, self.now, self.meter.s_per_token)

    def order_swapped(self, swapped: Sequence[Request]) -> list[Request]:
        views = [self._view(r, None) for r in swapped]
        return [swapped[i] for i in self.policy.order_swapped(views, self.now)]

    def plan_room(
        self, head: Request, shortfall: int, running: Sequence[Request], kv: KVCacheManager
    ) -> RoomPlan:
        """The policy's victims for ``head`` (``shortfall`` chunks short), if the host tier
        can take them all; otherwise no victim (today's behaviour: wait), logged once."""
        view = WaitingView(
            head.rid, head.arrival, head.num_tokens, head.first_token_time is not None
        )
        runs = [self._view(r, kv) for r in running]
        plan = self.policy.make_room(
            view, shortfall, runs, self.now, self.step, self.meter.s_per_token
        )
        if not plan.victims:
            return plan
        by_id = {r.rid: r for r in running}
        host_chunks = sum(_host_chunks(by_id[v], kv) for v in plan.victims)
        why_not = self._why_no_swap(host_chunks)
        if why_not:
            self.refused += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "SLO-aware admission cannot swap out (%s): admission waits for memory", why_not
                )
            return RoomPlan((), False, why_not)
        log.info("request %d: %s", head.rid, plan.reason)
        return plan

    def on_swapped_out(self, rid: int) -> None:
        self.swap_outs += 1
        self._swapped_at[rid] = self.step

    def forget(self, rid: int) -> None:
        """The request left the engine (finished or aborted)."""
        self._swapped_at.pop(rid, None)

    def _why_no_swap(self, host_chunks: int) -> str:
        if self.swap is None:
            return "no host KV tier (--swap-space 0)"
        if self.swap.cost.mode == "recompute":
            return "preemption_mode is recompute"
        usage = self.swap.tier.usage()
        free = usage.capacity_slots - usage.used_slots
        if host_chunks > free:
            return f"host KV tier full ({free} of {host_chunks} chunks free)"
        return ""

    def _view(self, r: Request, kv: KVCacheManager | None) -> RunningView:
        """``kv`` None: a swapped request (it frees nothing)."""
        frees = 0
        # What SwapPlanner.swap_out takes; not a request swapped in this very step (its
        # copy-in is planned: the tier holds it until the copy ends).
        copying_in = self.swap is not None and self.swap.tier.extent(r.rid) is not None
        if kv is not None and r.num_computed > 0 and r.num_tokens < r.max_len and not copying_in:
            first, _ = swap_chunks.private_tail(kv, r.rid, r.num_computed)
            frees = kv.slots.asked(kv.slots.slot_of(r.rid)) - first + 1  # + its headroom chunk
        return RunningView(
            r.rid,
            r.first_token_time,
            r.num_output,
            r.last_token_time,
            frees,
            self._swapped_at.get(r.rid),
            r.max_len - r.num_tokens,
        )


def _host_chunks(req: Request, kv: KVCacheManager) -> int:
    first, end = swap_chunks.private_tail(kv, req.rid, req.num_computed)
    return end - first
