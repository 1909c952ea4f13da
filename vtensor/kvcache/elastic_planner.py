"""One budget for the KV cache and the forward's workspace (eLLM's inflate/deflate).
Torch-free.

The *unified budget* ``U`` (chunks, the scratch slot excluded) is shared by the KV
cache and the workspace a step needs (``WorkspaceTable``: bytes as a function of the
step's tokens). Each step the planner decides how many tokens the step may take and
so how many chunks its workspace reserves, ``W(t)``; the KV may commit the rest,
``U - W(t)``. The *static split* reserves ``W(max_num_batched_tokens)`` for good; what
the KV may commit beyond that is *borrowed* from the workspace (it *inflates* during
decode-heavy steps) and given back before a step that needs it (it *deflates*).

Deflation takes KV chunks in order: idle KV (idle slots, surplus), then cached KV
(unlocked prefix-cache blocks, least recently used first), then running requests
leave the GPU, the one with the most *slack* first. **Slack** is the number of output
tokens a request may still produce (``max_len - num_tokens``; ties: the newest): the
request furthest from done, whose completion a pause delays least in proportion and
which would otherwise hold its KV longest. A victim is swapped to the host tier if
one is configured and takes it (the scheduler's swap planner), else recomputed later.

Invariant (the planner's contract, checked by ``tests/test_elastic_statemachine.py``):
after every step, ``workspace + KV committed <= U``, and no request is lost.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from .workspace_table import WorkspaceTable


@dataclass(frozen=True)
class Candidate:
    """A running request that deflation may preempt."""

    rid: int
    frees: int  # chunks its preemption unpins (the private chunks its slot maps)
    slack: int  # output tokens it may still produce
    order: int  # admission order, larger = newer (breaks ties of slack)


@dataclass(frozen=True)
class PoolState:
    """The unified pool before a step, in chunks. ``idle`` and ``cached`` are the KV
    chunks a reclaim may take (idle slots and surplus; unlocked cache blocks); the rest
    of ``committed`` is pinned by running (or swapped) requests."""

    budget: int
    committed: int
    idle: int
    cached: int

    def __post_init__(self) -> None:
        if min(self.budget, self.committed, self.idle, self.cached) < 0:
            raise ValueError(f"negative chunk count in {self}")
        if self.idle + self.cached > self.committed:
            raise ValueError(f"reclaimable chunks exceed committed in {self}")

    @property
    def pinned(self) -> int:
        return self.committed - self.idle - self.cached


@dataclass(frozen=True)
class StepDemand:
    """What the next step asks for. ``min_tokens``: one per running request (the least
    that keeps every one progressing); ``run_tokens``: what the running requests would
    compute with room; ``queued_tokens``: what queued (waiting, swapped) requests would
    add, and ``queued_chunks`` the KV the first of them needs to be admitted (its whole
    prompt: admission asks for it); ``rows``: requests the step may hold (each may start
    a new KV chunk). Token counts are at most the step budget."""

    min_tokens: int
    run_tokens: int
    rows: int
    candidates: tuple[Candidate, ...] = ()
    queued_tokens: int = 0
    queued_chunks: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.min_tokens <= self.run_tokens or self.rows < 0:
            raise ValueError(f"need 0 <= min_tokens <= run_tokens and rows >= 0: {self}")
        if self.queued_tokens < 0 or self.queued_chunks < 0:
            raise ValueError(f"queued tokens and chunks must be >= 0: {self}")


@dataclass(frozen=True)
class MemoryPlan:
    """The step's share of the budget: ``token_budget`` tokens, a workspace of
    ``workspace`` chunks, ``kv_capacity = budget - workspace`` chunks for the KV. Before
    the step, preempt ``victims`` (in order), then reclaim ``reclaim_idle`` idle and
    ``reclaim_cached`` cached chunks, so that KV committed <= kv_capacity."""

    token_budget: int
    workspace: int
    kv_capacity: int
    reclaim_idle: int = 0
    reclaim_cached: int = 0
    victims: tuple[Candidate, ...] = ()


class MemoryPlanner(ABC):
    """Splits one budget between the KV cache and the next step's workspace.

    Contract of ``plan``: given the pool before a step and the step's demand, return
    a plan whose ``workspace + kv_capacity <= state.budget`` and whose
    ``kv_capacity`` is at least what stays pinned once the victims are gone (so the
    reclaims it names can reach it: KV committed <= kv_capacity before the step). It
    decides in plain ints and changes nothing: the scheduler carries the plan out.
    ``token_budget >= demand.min_tokens`` minus one per victim, unless even that
    cannot fit with nothing left to preempt."""

    table: WorkspaceTable

    @abstractmethod
    def plan(self, state: PoolState, demand: StepDemand) -> MemoryPlan: ...

    def may_preempt(self, state: PoolState, demand: StepDemand) -> bool:
        """Whether ``plan`` could name victims, so that the caller must list the
        ``demand.candidates`` (a scan of every running request's chunks: worth skipping
        when it cannot matter). The static split never preempts."""
        return False

    def static_kv_capacity(self, budget: int) -> int:
        """The KV's share under the static split: the largest step's workspace reserved."""
        return budget - self.table.chunks_for(self.table.max_tokens)


class StaticPlanner(MemoryPlanner):
    """The static split as a planner (the baseline): the workspace of the largest step
    is reserved for good; the KV never borrows it and nothing is ever deflated."""

    def __init__(self, table: WorkspaceTable) -> None:
        self.table = table

    def plan(self, state: PoolState, demand: StepDemand) -> MemoryPlan:
        workspace = self.table.chunks_for(self.table.max_tokens)
        budget = min(demand.run_tokens + demand.queued_tokens, self.table.max_tokens)
        return MemoryPlan(budget, workspace, state.budget - workspace)


class ElasticPlanner(MemoryPlanner):
    """Inflate/deflate: the step takes the most tokens (up to what it wants) whose
    workspace, plus the KV its tokens will write, fits beside the pinned KV; idle and
    cached KV are reclaimed for it; running requests are preempted, most slack first,
    only when even one token per running request does not fit.

    ``kv_bytes_per_token``: one token's KV (every layer), to reserve the KV a step's
    tokens write: ``ceil(t * bytes / chunk) + rows`` chunks (each row may start one)."""

    def __init__(self, table: WorkspaceTable, kv_bytes_per_token: int) -> None:
        if kv_bytes_per_token <= 0:
            raise ValueError("kv_bytes_per_token must be positive")
        self.table = table
        self.kv_bytes_per_token = kv_bytes_per_token

    def growth(self, tokens: int, rows: int) -> int:
        """KV chunks a step of ``tokens`` tokens over ``rows`` requests may newly map."""
        return -(-tokens * self.kv_bytes_per_token // self.table.chunk_size) + min(rows, tokens)

    def plan(self, state: PoolState, demand: StepDemand) -> MemoryPlan:
        pinned, rows, t_min = state.pinned, demand.rows, demand.min_tokens
        victims: list[Candidate] = []
        queue = sorted(demand.candidates, key=lambda c: (-c.slack, -c.order))
        while queue and not self._fits(state.budget, pinned, t_min, rows):
            v = queue.pop(0)
            victims.append(v)
            pinned -= min(v.frees, pinned)
            t_min, rows = max(0, t_min - 1), max(0, rows - 1)
        top = self.table.max_tokens
        run = min(max(t_min, demand.run_tokens - len(victims)), top)
        tokens = -1
        if demand.queued_chunks and not victims:  # room to admit the queue's head?
            hi = min(run + demand.queued_tokens, top)
            with_head = pinned + demand.queued_chunks
            tokens = self._most_tokens(state.budget, with_head, run + 1, hi, rows + 1, strict=True)
        if tokens < 0:  # no admission: the running requests alone
            tokens = self._most_tokens(state.budget, pinned, t_min, run, rows)
        workspace = self.table.chunks_for(tokens)
        capacity = state.budget - workspace
        # The victims' chunks become reclaimable (idle, or unmapped by a swap-out).
        idle = state.idle + (state.pinned - pinned)
        excess = max(0, state.committed - capacity)
        from_idle = min(excess, idle)
        from_cached = min(excess - from_idle, state.cached)
        return MemoryPlan(tokens, workspace, capacity, from_idle, from_cached, tuple(victims))

    def may_preempt(self, state: PoolState, demand: StepDemand) -> bool:
        """Victims are taken only while one token per running request does not fit."""
        return not self._fits(state.budget, state.pinned, demand.min_tokens, demand.rows)

    def _fits(self, budget: int, pinned: int, tokens: int, rows: int) -> bool:
        need = self.table.chunks_for(tokens) + self.growth(tokens, rows)
        return need + pinned <= budget

    def _most_tokens(
        self, budget: int, pinned: int, lo: int, hi: int, rows: int, strict: bool = False
    ) -> int:
        """The most tokens in ``[lo, hi]`` that fit (binary search: the need grows with
        tokens). If ``lo`` does not fit: -1 when ``strict``, else the most that fits at
        all (nothing is left to preempt), so that the invariant still holds."""
        if lo > hi or not self._fits(budget, pinned, lo, rows):
            if strict:
                return -1
            lo, hi = 0, lo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self._fits(budget, pinned, mid, rows):
                lo = mid
            else:
                hi = mid - 1
        return lo
