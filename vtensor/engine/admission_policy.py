"""Admission policies: in which order waiting requests are admitted, and whether running
requests are swapped out to make room for one (torch-free).

The scheduler (``scheduler.py``) asks its policy two things, every step, with every
input explicit (no clock is read here: ``now`` is passed in):

* ``order``: the waiting requests' admission order. Admission stays head-blocking: the
  first request in this order that does not fit stops the rest.
* ``make_room``: the head of that order does not fit the KV memory; which running
  requests should be swapped out (to the host tier) so that it does?
* ``waiting_first``: with requests in the host tier (swapped out), is the waiting head
  admitted before they are swapped back in (its TTFT is more at stake than their TPOT)?
  and ``order_swapped``: in which order they come back.

:class:`FCFSPolicy` is the behaviour without SLOs (arrival order, never make room);
with no SLO set the engine builds no policy at all, so the scheduler runs exactly its
old code path. :class:`SLOPolicy` (``slo_policy.py``) orders by TTFT slack and swaps
out the running requests with the most TPOT slack.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WaitingView:
    """What a policy knows of a waiting request."""

    rid: int
    arrival: float  # on the engine's request clock, like ``now``
    tokens: int  # tokens its admission must prefill (its prompt; more after a recompute)
    started: bool  # it produced a token already (recomputed after a preemption)


@dataclass(frozen=True)
class RunningView:
    """What a policy knows of a running request."""

    rid: int
    first_token_time: float | None  # None: still prefilling
    num_generated: int  # tokens the host has read
    last_token_time: float | None
    # KV chunks its swap-out makes admissible: its private chunks, plus the headroom chunk
    # admission keeps per running request (0: it cannot be swapped out)
    frees_chunks: int
    last_slo_swap_step: int | None  # the step it was last swapped out for an SLO
    remaining: int = 0  # tokens it may still generate (max_tokens left; it may stop sooner)


@dataclass(frozen=True)
class RoomPlan:
    """``victims`` (running request ids, each at most once) to swap out, in order; ``fits``:
    after them the head fits. A plan that does not fit names no victim."""

    victims: tuple[int, ...]
    fits: bool
    reason: str  # one line for the log


NO_ROOM = RoomPlan((), False, "no SLO: admission waits for memory")


class AdmissionPolicy(ABC):
    """The pluggable part of admission.

    Contract:

    * ``order`` returns a permutation of ``range(len(waiting))``: the admission order;
    * ``make_room`` is asked only when the head of that order does not fit: it needs
      ``shortfall`` > 0 more chunks. Swapping out running request ``r`` makes
      ``r.frees_chunks`` more chunks admissible. The plan names only ids of
      ``running``, each once, none with ``frees_chunks == 0``, and
      ``fits`` iff the victims' ``frees_chunks`` add up to at least ``shortfall``; a
      plan that does not fit names no victim (swapping some out would not admit it);
    * both are pure functions of their arguments (no clock, no hidden state), so that a
      test drives them with a manual clock.
    """

    @abstractmethod
    def order(
        self, waiting: Sequence[WaitingView], now: float, prefill_s_per_token: float
    ) -> list[int]: ...

    def waiting_first(
        self,
        head: WaitingView,
        swapped: Sequence[RunningView],
        now: float,
        prefill_s_per_token: float,
    ) -> bool:
        """Admit ``head`` before swapping ``swapped`` (not empty) back in? Default: no,
        swapped requests are older than the queue (the scheduler's FCFS rule)."""
        return False

    def order_swapped(self, swapped: Sequence[RunningView], now: float) -> list[int]:
        """The order swapped requests come back in (a permutation); default: as queued."""
        return list(range(len(swapped)))

    @abstractmethod
    def make_room(
        self,
        head: WaitingView,
        shortfall: int,
        running: Sequence[RunningView],
        now: float,
        step: int,
        prefill_s_per_token: float,
    ) -> RoomPlan: ...


class FCFSPolicy(AdmissionPolicy):
    """First come, first served; admission waits for memory (the scheduler's behaviour
    with no policy)."""

    def order(
        self, waiting: Sequence[WaitingView], now: float, prefill_s_per_token: float
    ) -> list[int]:
        return list(range(len(waiting)))

    def make_room(
        self,
        head: WaitingView,
        shortfall: int,
        running: Sequence[RunningView],
        now: float,
        step: int,
        prefill_s_per_token: float,
    ) -> RoomPlan:
        return NO_ROOM


@dataclass
class PrefillCostMeter:
    """Seconds per prefilled token, a running mean (exponential, weight ``alpha`` per
    measurement) of the steps that prefill; 0 before the first measurement (no estimate:
    slack is then the time to the deadline)."""

    alpha: float = 0.2
    s_per_token: float = 0.0
    measurements: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")

    def observe(self, seconds: float, tokens: int) -> None:
        """A step of ``tokens`` tokens took ``seconds``; ignored when it computed none."""
        if tokens <= 0 or seconds < 0:
            return
        rate = seconds / tokens
        first = self.measurements == 0
        self.s_per_token = (
            rate if first else self.s_per_token + self.alpha * (rate - self.s_per_token)
        )
        self.measurements += 1
