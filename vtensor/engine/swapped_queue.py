"""SwappedQueue: the requests preempted to the host KV tier, and the step's swap plans.

Torch-free; the scheduler owns one (``Scheduler.swap_queue``) and plans with it.
A swapped request keeps its slot and progress; its private chunks are on the
host (``swap_plan.py``). Swap-outs go to the front and resumes take from the
front (with SLOs the admission policy orders the queue first: ``reorder``).
Without a host tier (``planner`` None) nothing is ever swapped: every preemption
recomputes.

Invariant: a request is in ``queue`` exactly while its status is
``RequestStatus.SWAPPED`` (``engine/integrity.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import replace

from vtensor.kvcache.manager import KVCacheManager

from .request import Request
from .scheduler_output import SchedulerOutput
from .swap_plan import SwapPlan, SwapPlanner


class SwappedQueue:
    """The swapped requests, oldest first, and the swap plans of the step being planned."""

    def __init__(self, planner: SwapPlanner | None) -> None:
        self.planner = planner  # None: every preemption recomputes
        self.queue: deque[Request] = deque()
        self._outs: list[SwapPlan] = []  # swapped out in the step being planned
        self._unswapped: list[Request] = []  # gave their host copy up in it

    @property
    def swapping_out(self) -> bool:
        """Whether a request was swapped out in the step being planned."""
        return bool(self._outs)

    def swap_out(self, kv: KVCacheManager, req: Request, force: bool) -> bool:
        """Swap out the preempted ``req`` if the planner so decides (always with
        ``force``, if it fits the tier): its private chunks go to the host tier, it
        keeps its slot and waits at the front. False: nothing changed (recompute)."""
        plan = self.planner.swap_out(kv, req, force) if self.planner is not None else None
        if plan is None:
            return False
        self._outs.append(plan)
        self.queue.appendleft(req)
        return True

    def reorder(self, order: Iterable[Request]) -> None:
        """Put the queue in ``order`` (the admission policy's: most urgent first)."""
        self.queue = deque(order)

    def resume(
        self,
        kv: KVCacheManager,
        budget: int,
        running: list[Request],
        max_num_seqs: int,
        waiting: deque[Request],
        out: list[SwapPlan],
    ) -> int:
        """Swap requests back in, oldest first, while their chunks fit (keeping a chunk
        per running request, as admission does); each computes on from where it was,
        from the **next** step: its chunks are mapped and its copy queued in this one,
        which does not read them, so the copy overlaps this step's forward pass
        (``swap_driver.py``). They take none of this step's token budget (the chunks for
        their next tokens are mapped now, as the budget allows). A resumed request
        joins ``running`` and its plan ``out``. Returns the budget left: all of it."""
        while self.queue and budget > 0 and len(running) < max_num_seqs:
            assert self.planner is not None
            req = self.queue[0]
            n = min(req.num_tokens - req.num_computed, budget)
            plan = self.planner.swap_in(kv, req, req.num_computed + n, len(running))
            if plan is None:
                if running:
                    break  # running requests will finish and free chunks
                # Nothing runs, so nothing frees chunks: swapped requests' pinned cached
                # fronts hold the pool. The newest gives its KV up and recomputes.
                self._unswap(kv, self.queue[-1], waiting)
                continue
            self.queue.popleft()
            running.append(req)
            out.append(plan)
        return budget

    def drop(self, kv: KVCacheManager, req: Request) -> None:
        """Take ``req`` (finishing or aborted) out: its host copy goes, its slot idles."""
        assert self.planner is not None
        self.queue.remove(req)
        self.planner.drop(req)
        kv.release(req.rid)

    def with_swaps(self, out: SchedulerOutput, swapped_in: list[SwapPlan]) -> SchedulerOutput:
        """The step's swap plans; ``preempted`` keeps only the recomputed victims. The
        step's plans are taken: the next step starts with none."""
        swapped_out, self._outs = self._outs, []
        unswapped, self._unswapped = self._unswapped, []
        swapped_ids = {id(p.req) for p in swapped_out}
        return replace(
            out,
            preempted=[r for r in out.preempted if id(r) not in swapped_ids],
            swapped_out=swapped_out,
            swapped_in=swapped_in,
            unswapped=unswapped,
        )

    def _unswap(self, kv: KVCacheManager, req: Request, waiting: deque[Request]) -> None:
        """A swapped request drops its host copy and slot and waits (at the front of
        ``waiting``) to be recomputed."""
        self.drop(kv, req)
        assert self.planner is not None
        self.planner.decisions.dropped += 1
        waiting.appendleft(req)
        self._unswapped.append(req)
