"""Where each request's time went, for explaining TTFT SLO misses (torch-free).

A :class:`Timeline` is fed, once a step, the scheduler's three queues (waiting,
running, swapped) as they stand after the step's schedule, with the time the step
began. Between two observations a request is counted in the queue it was seen in:

* **queue**: waiting (never admitted, or preempted by recompute and waiting again);
* **prefill**: running before its first token (its prefill steps, and every step
  that computes others' spans beside it);
* **swapped**: in the host tier before its first token (a swap-in delays its TTFT);
* after the first token, time swapped out is counted apart (``swapped_after``: it
  costs TPOT, not TTFT), and so are its swap-outs.

Used by ``benchmarks/swap.py`` (the engine on a GPU) and ``slo_sim.py`` (the
scheduler alone on a simulated clock), so both explain a miss in the same words.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

PHASES = ("queue", "prefill", "swapped")


@dataclass
class RequestTimes:
    arrival: float
    first_token: float | None = None
    finish: float | None = None
    before_first: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    swapped_after: float = 0.0  # seconds swapped out after the first token
    swap_outs_before: int = 0  # times seen entering the swapped queue before the first token
    swap_outs_after: int = 0  # ... and after it
    _state: str | None = None  # queue, prefill/decode, swapped: as last observed
    _since: float = 0.0


class Timeline:
    def __init__(self) -> None:
        self.requests: dict[int, RequestTimes] = {}

    def arrive(self, rid: int, t: float) -> None:
        self.requests[rid] = RequestTimes(t, _state="queue", _since=t)

    def observe(
        self, t: float, waiting: Iterable[int], running: Iterable[int], swapped: Iterable[int]
    ) -> None:
        """The queues at time ``t`` (the schedule of the step starting at ``t``)."""
        for state, rids in (("queue", waiting), ("run", running), ("swapped", swapped)):
            for rid in rids:
                r = self.requests.get(rid)
                if r is None or r.finish is not None or r._state == state:
                    continue
                self._close(r, t)
                if state == "swapped" and r.first_token is None:
                    r.swap_outs_before += 1
                elif state == "swapped":
                    r.swap_outs_after += 1
                r._state, r._since = state, t

    def first_token(self, rid: int, t: float) -> None:
        r = self.requests[rid]
        if r.first_token is None:
            self._close(r, t)
            r.first_token, r._since = t, t

    def finish(self, rid: int, t: float) -> None:
        r = self.requests[rid]
        self._close(r, t)
        r.finish, r._state = t, None

    def _close(self, r: RequestTimes, t: float) -> None:
        """Count ``[r._since, t)`` in the phase ``r`` was in."""
        dt = max(0.0, t - r._since)
        r._since = t
        if r._state is None:
            return
        if r.first_token is None:
            r.before_first["prefill" if r._state == "run" else r._state] += dt
        elif r._state == "swapped":
            r.swapped_after += dt

    def ttft(self, rid: int) -> float | None:
        r = self.requests[rid]
        return None if r.first_token is None else r.first_token - r.arrival


@dataclass(frozen=True)
class MissBreakdown:
    """TTFT SLO misses, and where their time before the first token went."""

    requests: int
    missed: int
    by_cause: dict[str, int]  # the largest phase of each missed request's TTFT
    mean_s: dict[str, float]  # mean seconds per phase over the missed requests
    victim_swap_outs: int  # swap-outs of requests that had a first token already
    victim_swapped_s: float  # their seconds in the host tier after the first token

    def line(self) -> str:
        causes = ", ".join(f"{k} {v}" for k, v in self.by_cause.items())
        means = " / ".join(f"{self.mean_s[k] * 1e3:.0f}" for k in PHASES)
        return (
            f"TTFT missed {self.missed}/{self.requests} (largest part: {causes}); mean ms "
            f"queue/prefill/swapped of the missed {means}; swap-outs after the first token "
            f"{self.victim_swap_outs} ({self.victim_swapped_s:.1f} s swapped)"
        )


def misses(tl: Timeline, ttft_slo_s: float) -> MissBreakdown:
    done = [r for r in tl.requests.values() if r.first_token is not None]
    missed = [r for r in done if r.first_token - r.arrival > ttft_slo_s]  # type: ignore[operator]
    by_cause = dict.fromkeys(PHASES, 0)
    for r in missed:
        by_cause[max(PHASES, key=lambda k: r.before_first[k])] += 1
    n = max(1, len(missed))
    return MissBreakdown(
        len(done),
        len(missed),
        by_cause,
        {k: sum(r.before_first[k] for r in missed) / n for k in PHASES},
        sum(r.swap_outs_after for r in done),
        sum(r.swapped_after for r in done),
    )
