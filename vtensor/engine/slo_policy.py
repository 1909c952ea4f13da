"""SLO-aware admission (torch-free): order waiting requests by TTFT slack, and swap out
the running requests with the most TPOT slack when the most urgent one lacks KV memory.

With a time-to-first-token SLO ``ttft`` and a time-per-output-token SLO ``tpot``:

* a waiting request's **TTFT slack** is ``arrival + ttft - now - prefill_s_per_token x
  tokens``: how long it may still wait and meet its TTFT, given the prefill estimate
  (``PrefillCostMeter``, measured by the engine). Waiting requests are admitted in
  increasing slack; requests that already produced a token (recomputed after a
  preemption: their TTFT is spent, their stream is open) keep the front, in their order;
* a running request's **TPOT slack** is ``tpot x generated - (now - first token)``: how
  far ahead of its TPOT budget it is, in seconds. A request with slack >= 0 can sit out
  a while and still meet its TPOT on average.

When the head of the order does not fit and its TTFT slack is below ``urgency x ttft``
(half its budget by default: waiting for memory would spend the rest), the policy picks
victims with the most TPOT slack first, until their freed chunks cover the shortfall.
It never picks a request that is still prefilling (no first token: its TTFT is at
stake), one with negative TPOT slack, one that produced no token for longer than
``tpot`` (it is stalled already, e.g. just swapped back in), or one swapped out for an
SLO within the last ``no_reswap_steps`` steps (no thrash). If the eligible ones cannot
cover the shortfall it picks none: a swap-out that does not admit the head only costs.
Without a TPOT SLO every decoding request has unbounded slack; ties go to the newest
running request (the one preemption would take anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .admission_policy import AdmissionPolicy, RoomPlan, RunningView, WaitingView


@dataclass(frozen=True)
class SLOConfig:
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    urgency: float = 0.5  # make room when TTFT slack < urgency x ttft
    no_reswap_steps: int = 32  # a request swapped out for an SLO is spared this many steps

    def __post_init__(self) -> None:
        for name in ("ttft_slo_s", "tpot_slo_s"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number of seconds (or None), got {v}")
        if not 0 < self.urgency <= 1:
            raise ValueError(f"urgency must be in (0, 1], got {self.urgency}")
        if self.no_reswap_steps < 0:
            raise ValueError(f"no_reswap_steps must be >= 0, got {self.no_reswap_steps}")

    @property
    def enabled(self) -> bool:
        return self.ttft_slo_s is not None or self.tpot_slo_s is not None


class SLOPolicy(AdmissionPolicy):
    def __init__(self, config: SLOConfig) -> None:
        self.config = config

    def ttft_slack(self, w: WaitingView, now: float, prefill_s_per_token: float) -> float:
        ttft = self.config.ttft_slo_s
        if ttft is None:
            return math.inf
        return w.arrival + ttft - now - prefill_s_per_token * w.tokens

    def tpot_slack(self, r: RunningView, now: float, decode_s: float = 0.0) -> float:
        """Seconds it may still sit out and meet its TPOT SLO over its whole output: the
        budget ``tpot x (tokens after the first)`` less the time since its first token
        and its remaining tokens at ``decode_s`` each; -inf while it has no first token."""
        if r.first_token_time is None:
            return -math.inf
        tpot = self.config.tpot_slo_s
        if tpot is None:
            return math.inf
        after_first = r.num_generated + r.remaining - 1
        return tpot * after_first - (now - r.first_token_time) - decode_s * r.remaining

    def order(
        self, waiting: Sequence[WaitingView], now: float, prefill_s_per_token: float
    ) -> list[int]:
        if self.config.ttft_slo_s is None:
            return list(range(len(waiting)))
        # sorted() is stable: started requests keep their order, and so do equal slacks.
        return sorted(
            range(len(waiting)),
            key=lambda i: (
                not waiting[i].started,
                0.0
                if waiting[i].started
                else self.ttft_slack(waiting[i], now, prefill_s_per_token),
            ),
        )

    def waiting_first(
        self,
        head: WaitingView,
        swapped: Sequence[RunningView],
        now: float,
        prefill_s_per_token: float,
    ) -> bool:
        """Earliest deadline first across the two queues: the head goes first while every
        swapped request has more TPOT slack than the head has TTFT slack. Without both
        SLOs, swapped requests come back first (FCFS: they are older)."""
        if self.config.ttft_slo_s is None or self.config.tpot_slo_s is None or head.started:
            return False
        decode_s = decode_step_s(swapped)
        least = min(self.tpot_slack(r, now, decode_s) for r in swapped)
        return self.ttft_slack(head, now, prefill_s_per_token) < least

    def order_swapped(self, swapped: Sequence[RunningView], now: float) -> list[int]:
        """Least TPOT slack first (stable: ties keep the queue's order); the queue's
        order without both SLOs (``waiting_first`` is then never true either)."""
        if self.config.ttft_slo_s is None or self.config.tpot_slo_s is None:
            return list(range(len(swapped)))
        decode_s = decode_step_s(swapped)
        return sorted(range(len(swapped)), key=lambda i: self.tpot_slack(swapped[i], now, decode_s))

    def make_room(
        self,
        head: WaitingView,
        shortfall: int,
        running: Sequence[RunningView],
        now: float,
        step: int,
        prefill_s_per_token: float,
    ) -> RoomPlan:
        ttft = self.config.ttft_slo_s
        if ttft is None or head.started:
            return RoomPlan((), False, "no TTFT at stake")
        slack = self.ttft_slack(head, now, prefill_s_per_token)
        if slack >= self.config.urgency * ttft:
            return RoomPlan((), False, f"TTFT slack {slack * 1e3:.0f} ms: not urgent")
        decode_s = decode_step_s(running)
        ranked = sorted(
            (
                (r.remaining, i, r)
                for i, r in enumerate(running)
                if self._eligible(r, now, step, decode_s)
            ),
            key=lambda t: (-t[0], -t[1]),  # the longest to run first; ties: the newest
        )
        victims: list[int] = []
        freed = 0
        for _, _, r in ranked:
            if freed >= shortfall:
                break
            victims.append(r.rid)
            freed += r.frees_chunks
        if freed < shortfall:
            why = f"swappable requests free {freed} of {shortfall} chunks"
            return RoomPlan((), False, f"TTFT slack {slack * 1e3:.0f} ms, but {why}")
        why = f"swap out {len(victims)} request(s) for {shortfall} chunk(s)"
        return RoomPlan(tuple(victims), True, f"TTFT slack {slack * 1e3:.0f} ms: {why}")

    def _eligible(self, r: RunningView, now: float, step: int, decode_s: float) -> bool:
        if r.frees_chunks <= 0 or r.first_token_time is None:
            return False
        if (
            r.last_slo_swap_step is not None
            and step - r.last_slo_swap_step < self.config.no_reswap_steps
        ):
            return False
        tpot = self.config.tpot_slo_s
        if tpot is not None and r.last_token_time is not None and now - r.last_token_time > tpot:
            return False  # stalled already: swapping it again stalls it twice
        return self.tpot_slack(r, now, decode_s) >= 0


def decode_step_s(views: Sequence[RunningView]) -> float:
    """The decode step time the requests show: the least mean time between tokens of any
    of them with two or more (the one stalled least); 0 with none (no estimate)."""
    rates = [
        (r.last_token_time - r.first_token_time) / (r.num_generated - 1)
        for r in views
        if r.first_token_time is not None and r.last_token_time is not None and r.num_generated >= 2
    ]
    return min(rates, default=0.0)
