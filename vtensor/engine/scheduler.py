"""Continuous batching with chunked prefill (a prompt is prefilled in spans), FCFS,
and preemption by recompute or by swap to the host KV tier.

Torch-free: it moves :class:`Request` objects between the waiting queue and
the running list, and keeps :class:`KVCacheManager` in step with them. It
plans and never writes a request: its output names the spans, admissions and
preemptions, and ``LLMEngine`` applies them to the requests (``engine/request.py``).
It is also the one place that takes the KV manager's commands, so every
mapping change reaches the engine through a :class:`SchedulerOutput`.

One step, under a token budget:

0. Running requests offer the prefix cache their newly computed whole blocks
   (only tokens the host has read: never an async placeholder).
1. Running requests, oldest first, get their next span (1 token when
   decoding). If the KV cache cannot grow (after reclaiming idle chunks and
   unlocked cache blocks), the newest running request is preempted — its slot
   idles, its computed blocks stay cached, and it goes back to the front of the
   queue to be recomputed — until the growth fits. Nothing is dropped. With a
   host KV tier the victim may be *swapped* instead (``swap_plan.py``): its
   private chunks are copied to host memory, it keeps its slot and progress, and
   it waits in the ``swapped`` queue.
2. Swapped requests resume first, oldest first, while their chunks fit (fresh
   chunks at the same indices; the engine copies their KV back before the
   forward pass). Then waiting requests are admitted in arrival order while the budget, a free
   slot and free chunks allow (strict FCFS: the queue head blocks the rest).
   A request's longest cached prefix (whole blocks, at most all but its last
   token) is shared into its slot; its first span starts after it. With a host
   tier the prefix may end in spilled blocks: they get fresh chunks in the slot
   and the engine copies them back in before the forward pass (``restores``);
   blocks the cache spilled this step are copied out before their chunks are
   dropped (``spills``; ``engine/spill.py``).
   With SLOs (``slo_admission.py``) the queue is first put in the admission
   policy's order (TTFT slack), and a head that lacks KV memory may have the
   policy's victims swapped out for it (``_make_room``); the head still blocks. The
   policy may also put the waiting head before swapped requests (earliest deadline
   first: ``_resume_and_admit``).
3. Every span's KV writes are checked to touch only chunks its request maps
   alone (``KVCacheManager.check_writes``): cached chunks are read-only.
4. Chunks the *next* step will need are mapped ahead when free chunks allow,
   so that the mapper works while the GPU computes.

With the unified memory pool (``elastic.py``), step 1 is preceded by the step's
share of the one budget: its token budget, and the KV's limit (deflation may
reclaim idle and cached KV and preempt the request with the most slack first).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

from vtensor.kvcache.manager import KVCacheManager
from vtensor.kvcache.prefix_cache import PrefixMatch

from .elastic import ElasticMemory, most_slack
from .map_ahead import map_ahead, premap_waiting
from .request import Request, RequestStatus
from .scheduler_config import SchedulerConfig
from .scheduler_output import Admission, ScheduledSpan, SchedulerOutput
from .slo_admission import SLOAdmission
from .swap_plan import SwapPlan, SwapPlanner
from .swapped_queue import SwappedQueue


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        swap: SwapPlanner | None = None,
        admission: SLOAdmission | None = None,
        memory: ElasticMemory | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.swap_queue = SwappedQueue(swap)  # its planner None: every preemption recomputes
        self.admission = admission  # None: FCFS, and admission only waits for memory
        self.memory = memory  # None: the static split (no unified memory pool)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: oldest first
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens of admitted requests (vLLM's prefix-cache queries)
        self.prefix_hits = 0  # of which their KV came from the prefix cache
        self.prefix_host_hits = 0  # of those, restored from the host tier (spilled blocks)

    @property
    def swap(self) -> SwapPlanner | None:
        """The host tier's swap planner (None: every preemption recomputes)."""
        return self.swap_queue.planner

    @property
    def swapped(self) -> deque[Request]:
        """Requests preempted to the host tier, resumed first (``SwappedQueue``)."""
        return self.swap_queue.queue

    def add(self, req: Request) -> None:
        if req.status is not RequestStatus.WAITING:
            raise ValueError(f"request {req.rid} is {req.status.value}, not waiting")
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self) -> SchedulerOutput:
        """Plan the next step. With nothing to run the plan is empty, but it still
        carries the commands of the slots released since the last schedule."""
        budget = self.config.max_num_batched_tokens
        spans: list[ScheduledSpan] = []
        preempted: list[Request] = []
        if self.admission is not None:
            self.admission.begin_step()
            order = self.admission.order(self.waiting)
            self.waiting.clear()  # in place: the queue object is shared with readers
            self.waiting.extend(order)
        for req in self.running:
            self._offer(req)
        if self.memory is not None:  # the unified pool: the step's share of the budget
            budget = self._plan_memory(preempted)
        for req in list(self.running):
            if budget == 0:
                break
            if req in preempted:  # preempted earlier in this loop (as someone's victim)
                continue
            if req.num_tokens >= req.max_len:
                continue  # its last token is awaited (async scheduling): it ends on length
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow_or_preempt(req, req.num_computed + n, preempted):
                break  # req preempted itself: nothing newer is left running
            spans.append(ScheduledSpan.next_of(req, req.num_computed, n))
            budget -= n
        admitted: list[Admission] = []
        swapped_in: list[SwapPlan] = []
        if not preempted:
            admitted = self._resume_and_admit(spans, budget, swapped_in)
        self.kv.check_writes((sp.req.rid, sp.start, sp.end) for sp in spans)
        kv_commands = self.kv.take_commands()
        map_ahead(self.kv, spans, self.config.lookahead_tokens)
        cfg, num_running = self.config, len(self.running)
        premap_waiting(
            self.kv, self.waiting, num_running, cfg.max_num_seqs, cfg.max_num_batched_tokens
        )
        out = SchedulerOutput(spans, preempted, admitted, kv_commands, self.kv.take_commands())
        if self.swap is None:
            return out
        out = replace(out, spills=self.kv.take_spills(), restores=self.kv.take_restores())
        return self.swap_queue.with_swaps(out, swapped_in)

    def remove(self, req: Request) -> None:
        """Take a finishing (or aborted) request out of the queues; its slot idles with
        its chunks. The unmaps that may cause go out with the next schedule."""
        if self.admission is not None:
            self.admission.forget(req.rid)
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
            self._offer(req)
            self.kv.release(req.rid)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        elif req.status is RequestStatus.SWAPPED:
            self.swap_queue.drop(self.kv, req)

    # ---------------------------------------------------------------- private
    def _grow_or_preempt(self, req: Request, tokens: int, preempted: list[Request]) -> bool:
        """Grow ``req``'s KV to ``tokens``, preempting newest requests as needed.

        Returns False when ``req`` itself had to be preempted.
        """
        while not self.kv.grow(req.rid, tokens):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        return True

    def _plan_memory(self, preempted: list[Request]) -> int:
        """Split the unified budget for this step (``elastic.py``): preempt the planner's
        victims (swap or recompute, as any preemption), reclaim, limit the KV; returns
        the step's token budget. Admissions are skipped after a preemption, as always."""
        assert self.memory is not None
        queued = [*self.swapped, *self.waiting]
        cfg = self.config
        plan = self.memory.plan(
            self.kv, self.running, queued, cfg.max_num_batched_tokens, cfg.max_num_seqs
        )
        by_rid = {r.rid: r for r in self.running}
        for v in plan.victims:
            self._preempt(by_rid[v.rid])
            preempted.append(by_rid[v.rid])

        def preempt_one() -> bool:
            victim = most_slack(self.running)
            if victim is not None:
                self._preempt(victim)
                preempted.append(victim)
            return victim is not None

        return self.memory.settle(self.kv, plan, preempt_one)

    def _offer(self, req: Request) -> None:
        """Offer the prefix cache the request's computed blocks whose ids are read."""
        self.kv.cache_tokens(req.rid, req.token_ids, min(req.num_computed, len(req.token_ids)))

    def _preempt(self, req: Request, force_swap: bool = False) -> None:
        self.running.remove(req)
        self._offer(req)  # its prefix stays cached: recomputing it is a hit
        self.num_preemptions += 1
        if self.swap_queue.swap_out(self.kv, req, force_swap):
            return  # its private chunks go to the host tier; it keeps its slot
        self.kv.release(req.rid)
        self.waiting.appendleft(req)

    def _resume_and_admit(
        self, spans: list[ScheduledSpan], budget: int, swapped_in: list[SwapPlan]
    ) -> list[Admission]:
        """Swapped requests come back first, oldest first, then waiting ones are admitted
        (FCFS: swapped requests are older than the queue). With SLOs the admission
        policy may put the waiting head first (its TTFT is more at stake than their
        TPOT: ``AdmissionPolicy.waiting_first``): then swapped requests come back,
        most urgent first, only once the queue is empty (the head still blocks)."""
        adm = self.admission
        if adm is not None and self.swapped:
            self.swap_queue.reorder(adm.order_swapped(self.swapped))
            if adm.waiting_first(self.waiting, self.swapped):
                admitted = self._admit(spans, budget)
                if not self.waiting and not self.swap_queue.swapping_out:  # none copying out
                    left = self.config.max_num_batched_tokens - sum(sp.num_tokens for sp in spans)
                    self._resume(left, swapped_in)
                return admitted
        if self.swapped:  # only with a host tier
            budget = self._resume(budget, swapped_in)
        if not self.swapped:  # FCFS: swapped requests are older than the queue
            return self._admit(spans, budget)
        return []

    def _resume(self, budget: int, out: list[SwapPlan]) -> int:
        """``SwappedQueue.resume`` on the running list (a swapped request that gives its
        KV up goes to the front of the waiting queue)."""
        q, cfg = self.swap_queue, self.config
        return q.resume(self.kv, budget, self.running, cfg.max_num_seqs, self.waiting, out)

    def _admit(self, spans: list[ScheduledSpan], budget: int) -> list[Admission]:
        """Admit waiting requests FCFS within ``budget``; each computes from the end of
        its cached prefix (token 0 without a hit)."""
        admitted: list[Admission] = []
        made_room_for: Request | None = None
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.match(req.token_ids, req.num_tokens - 1)
            # Admit only if the whole prompt fits, keeping a chunk per running request
            # so decodes can grow without immediately preempting the newcomer.
            if not self.kv.can_admit(req.num_tokens + 1, len(self.running), hit):
                if made_room_for is req or not self._make_room(req, hit, spans):
                    break
                made_room_for = req  # once: the plan's arithmetic is the books' own
                budget = self.config.max_num_batched_tokens - sum(sp.num_tokens for sp in spans)
                continue
            n = min(req.num_tokens - hit.tokens, budget)
            if self.kv.admit(req.rid, hit.tokens + n, hit) is None:
                break
            self.waiting.popleft()
            self.running.append(req)
            admitted.append(Admission(req, hit.tokens))
            self.prefix_queries += req.num_tokens
            self.prefix_hits += hit.tokens
            self.prefix_host_hits += hit.restore * self.kv.cache.block_tokens
            spans.append(ScheduledSpan.next_of(req, hit.tokens, n))
            budget -= n
        return admitted

    def _make_room(self, req: Request, hit: PrefixMatch, spans: list[ScheduledSpan]) -> bool:
        """SLO-aware admission: swap out the admission policy's victims so that ``req``
        fits (their spans leave this step). False: nothing changed."""
        if self.admission is None or not self.kv.slots.has_free_slot():
            return False  # a swapped request keeps its slot: swapping frees none
        short = self.kv.admit_shortfall(req.num_tokens + 1, len(self.running), hit)
        plan = self.admission.plan_room(req, short, self.running, self.kv)
        if not plan.fits or not plan.victims:
            return False
        chosen = set(plan.victims)
        victims = [r for r in self.running if r.rid in chosen]
        spans[:] = [sp for sp in spans if sp.req not in victims]
        for victim in victims:
            self._preempt(victim, force_swap=True)
            self.admission.on_swapped_out(victim.rid)
        return True
