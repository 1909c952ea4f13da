"""The scheduler's side of the unified memory pool (``EngineConfig.unified_memory_pool``).
Torch-free.

Before each step the scheduler asks :class:`ElasticMemory` for its token budget: it
reads the KV books and the queues (``PoolState``, ``StepDemand``), has the planner
(``kvcache/elastic_planner.py``) split the one budget between the KV and the step's
workspace, preempts the planner's victims (through the scheduler: swap or
recompute), reclaims idle then cached KV, and sets the KV manager's limit to the
KV's share. The engine then sets the pool's physical capacity to it
(``StepPlan.pool_chunks``): a shrink releases the freed chunks to the driver before
the forward pass, so that the workspace can really use them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from vtensor.kvcache.elastic_planner import (
    Candidate,
    MemoryPlan,
    MemoryPlanner,
    PoolState,
    StepDemand,
)
from vtensor.kvcache.manager import KVCacheManager

from .request import Request

log = logging.getLogger("vtensor.engine")


@dataclass
class ElasticCounters:
    """Running totals (``LLM.memory_stats()``, ``/metrics``)."""

    inflates: int = 0  # steps whose KV share grew
    deflates: int = 0  # steps whose KV share shrank
    deflate_idle_chunks: int = 0  # idle KV (and surplus) reclaimed for the workspace
    deflate_cached_chunks: int = 0  # prefix-cache blocks evicted for it
    deflate_preemptions: int = 0  # running requests that left the GPU for it


@dataclass(frozen=True)
class ElasticSnapshot:
    """The pool's split now, in chunks."""

    budget: int
    workspace: int  # the reserve of the last planned step
    kv_capacity: int  # the KV's share: budget - workspace
    static_kv_capacity: int  # the KV's share under the static split
    kv_committed: int

    @property
    def borrowed(self) -> int:
        """KV chunks in use beyond the static split's share: borrowed from the workspace."""
        return max(0, self.kv_committed - self.static_kv_capacity)


class ElasticMemory:
    def __init__(self, planner: MemoryPlanner, budget: int, provisional: bool = False) -> None:
        """``budget``: the chunks KV and the workspace share (the scratch slot excluded).
        ``provisional``: the table is a build-time estimate that warm-up replaces with a
        measured one (CUDA): an estimate leaving the KV nothing is then a warning, and
        the KV gets one chunk until the measurement, not an error."""
        self.planner = planner
        self.budget = budget
        self.static_kv_capacity = planner.static_kv_capacity(budget)
        if self.static_kv_capacity <= 0:
            what = (
                f"a unified budget of {budget} chunks leaves nothing for the KV beside the "
                f"largest step's workspace ({budget - self.static_kv_capacity} chunks)"
            )
            if not provisional:
                raise ValueError(what)
            log.warning("%s, by the shape-based estimate; warm-up measures it", what)
            self.static_kv_capacity = 1
        self.kv_capacity = self.static_kv_capacity  # until the first step is planned
        self.counters = ElasticCounters()

    @property
    def workspace(self) -> int:
        return self.budget - self.kv_capacity

    def snapshot(self, kv: KVCacheManager) -> ElasticSnapshot:
        return ElasticSnapshot(
            self.budget,
            self.workspace,
            self.kv_capacity,
            self.static_kv_capacity,
            kv.books.committed,
        )

    def violations(
        self, kv: KVCacheManager, created: int | None = None, held: int | None = None
    ) -> list[str]:
        """The unified pool's broken invariants (``created``: the chunks the pool has
        created, the scratch slot's excluded, once the mapper is idle; ``held``: the
        chunks a pool-backed workspace holds in the same pool, None without one)."""
        committed = kv.books.committed
        # Without a pool-backed workspace the pool holds only KV, within its share; with
        # one, KV and workspace together within the budget.
        room = self.kv_capacity if held is None else self.budget
        checks = [
            (self.workspace + committed <= self.budget,
             f"workspace {self.workspace} + KV {committed} chunks > budget {self.budget}"),
            (kv.capacity_chunks == self.kv_capacity,
             f"KV limit {kv.capacity_chunks} is not the KV's share {self.kv_capacity}"),
            (created is None or created <= room,
             f"the pool holds {created} chunks beyond {room} (the KV's share or budget)"),
            (held is None or held + committed <= self.budget,
             f"the workspace holds {held} + KV {committed} chunks > budget {self.budget}"),
        ]  # fmt: skip
        return [what for ok, what in checks if not ok]

    def plan(
        self,
        kv: KVCacheManager,
        running: Sequence[Request],
        queued: Sequence[Request],
        step_tokens: int,
        max_seqs: int,
    ) -> MemoryPlan:
        """The planner's split for the next step (changes nothing). The preemption
        candidates are listed only when the planner may take victims: their counts scan
        each running request's chunk table: at a 130k-token context, 8k chunks a request,
        every step."""
        state = pool_state(kv, self.budget)
        need = demand(kv, running, queued, step_tokens, max_seqs)
        if self.planner.may_preempt(state, need):
            need = replace(
                need, candidates=tuple(candidate(kv, r, i) for i, r in enumerate(running))
            )
        return self.planner.plan(state, need)

    def settle(self, kv: KVCacheManager, plan: MemoryPlan, preempt_one: Callable[[], bool]) -> int:
        """Carry out the plan once its victims are preempted: preempt more (most slack
        first, ``preempt_one``) while what stays pinned exceeds the KV's share (shared
        chunks free less than counted), reclaim idle then cached KV down to the share,
        and set the KV manager's limit. Returns the step's token budget."""
        tokens, capacity = plan.token_budget, plan.kv_capacity
        table = self.planner.table
        while kv.books.pinned > capacity:
            if not preempt_one():  # nothing left to preempt: fewer tokens, more KV
                tokens = min(tokens, table.max_tokens_within(self.budget - kv.books.pinned))
                capacity = self.budget - table.chunks_for(tokens)
                break
            self.counters.deflate_preemptions += 1
        self.counters.deflate_preemptions += len(plan.victims)
        excess = kv.books.committed - capacity
        if excess > 0:
            cached = kv.books.cached_count
            kv.reclaim(excess)
            evicted = cached - kv.books.cached_count
            self.counters.deflate_cached_chunks += evicted
            self.counters.deflate_idle_chunks += excess - evicted
        kv.capacity.set_limit(capacity)
        if capacity > self.kv_capacity:
            self.counters.inflates += 1
        elif capacity < self.kv_capacity:
            self.counters.deflates += 1
        self.kv_capacity = capacity
        return tokens


def pool_state(kv: KVCacheManager, budget: int) -> PoolState:
    books = kv.books
    reclaimable = books.committed - books.pinned
    idle = min(reclaimable, kv.slots.idle_chunks + kv.slots.surplus_chunks)
    return PoolState(budget, books.committed, idle, reclaimable - idle)


def demand(
    kv: KVCacheManager,
    running: Sequence[Request],
    queued: Sequence[Request],
    step_tokens: int,
    max_seqs: int,
) -> StepDemand:
    """The next step's demand: the running requests' spans (one token each at least;
    a request whose last token is awaited computes nothing), the queued requests'
    (``queued``: swapped, then waiting) and the KV the first of them needs. No
    preemption candidates: ``ElasticMemory.plan`` adds them when they may matter."""
    live = [r for r in running if r.num_tokens < r.max_len]
    run = min(step_tokens, sum(r.num_tokens - r.num_computed for r in live))
    queued_tokens = min(step_tokens, sum(r.num_tokens - r.num_computed for r in queued))
    head = kv.geometry.chunks_for(queued[0].num_tokens + 1) if queued else 0
    return StepDemand(
        min_tokens=min(len(live), run),
        run_tokens=run,
        rows=min(max_seqs, len(running) + len(queued)),
        queued_tokens=queued_tokens,
        queued_chunks=head,
    )


def candidate(kv: KVCacheManager, req: Request, order: int) -> Candidate:
    table = kv.slot_table(kv.slots.slot_of(req.rid))
    frees = sum(1 for c in table if kv.books.is_private(c) and kv.books.is_pinned(c))
    return Candidate(req.rid, frees, req.max_len - req.num_tokens, order)


def most_slack(running: Sequence[Request]) -> Request | None:
    """The running request with the most slack (see ``elastic_planner.py``; ties: the
    newest), or None."""
    best: Request | None = None
    for req in running:  # oldest first, so >= keeps the newest of equals
        if best is None or req.max_len - req.num_tokens >= best.max_len - best.num_tokens:
            best = req
    return best
