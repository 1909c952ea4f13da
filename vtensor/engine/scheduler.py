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

import itertools
from collections import deque
from dataclasses import dataclass, replace

from vtensor.kvcache.manager import KVCacheManager
from vtensor.kvcache.prefix_cache import PrefixMatch

from .elastic import ElasticMemory, most_slack
from .request import Request, RequestStatus
from .scheduler_output import Admission, ScheduledSpan, SchedulerOutput
from .slo_admission import SLOAdmission
from .swap_plan import SwapPlan, SwapPlanner


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    lookahead_tokens: int = 4  # decode steps mapped ahead (vAttention maps ~10 ahead)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.lookahead_tokens < 0:
            raise ValueError("lookahead_tokens must be >= 0")


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
        self.swap = swap  # None: every preemption recomputes
        self.admission = admission  # None: FCFS, and admission only waits for memory
        self.memory = memory  # None: the static split (no unified memory pool)
        self.waiting: deque[Request] = deque()
        self.swapped: deque[Request] = deque()  # preempted to the host tier, resumed first
        self._swap_outs: list[SwapPlan] = []
        self._unswapped: list[Request] = []
        self.running: list[Request] = []  # admission order: oldest first
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens of admitted requests (vLLM's prefix-cache queries)
        self.prefix_hits = 0  # of which their KV came from the prefix cache
        self.prefix_host_hits = 0  # of those, restored from the host tier (spilled blocks)

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
        self._map_ahead(spans)
        self._premap_waiting()
        out = SchedulerOutput(spans, preempted, admitted, kv_commands, self.kv.take_commands())
        if self.swap is None:
            return out
        out = replace(out, spills=self.kv.take_spills(), restores=self.kv.take_restores())
        return self._with_swaps(out, swapped_in)

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
            assert self.swap is not None
            self.swapped.remove(req)
            self.swap.drop(req)
            self.kv.release(req.rid)

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
        plan = self.swap.swap_out(self.kv, req, force_swap) if self.swap is not None else None
        if plan is not None:  # its private chunks go to the host tier; it keeps its slot
            self._swap_outs.append(plan)
            self.swapped.appendleft(req)
            return
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
            self.swapped = deque(adm.order_swapped(self.swapped))
            if adm.waiting_first(self.waiting, self.swapped):
                admitted = self._admit(spans, budget)
                if not self.waiting and not self._swap_outs:  # none copying out now
                    left = self.config.max_num_batched_tokens - sum(sp.num_tokens for sp in spans)
                    self._resume(left, swapped_in)
                return admitted
        if self.swapped:  # only with a host tier
            budget = self._resume(budget, swapped_in)
        if not self.swapped:  # FCFS: swapped requests are older than the queue
            return self._admit(spans, budget)
        return []

    def _resume(self, budget: int, out: list[SwapPlan]) -> int:
        """Swap requests back in, oldest first, while their chunks fit (keeping a chunk
        per running request, as admission does); each computes on from where it was,
        from the **next** step: its chunks are mapped and its copy queued in this one,
        which does not read them, so the copy overlaps this step's forward pass
        (``swap_driver.py``). They take none of this step's token budget (the chunks for
        their next tokens are mapped now, as the budget allows). Returns the budget
        left: all of it."""
        while self.swapped and budget > 0 and len(self.running) < self.config.max_num_seqs:
            assert self.swap is not None
            req = self.swapped[0]
            n = min(req.num_tokens - req.num_computed, budget)
            plan = self.swap.swap_in(self.kv, req, req.num_computed + n, len(self.running))
            if plan is None:
                if self.running:
                    break  # running requests will finish and free chunks
                # Nothing runs, so nothing frees chunks: swapped requests' pinned cached
                # fronts hold the pool. The newest gives its KV up and recomputes.
                self._unswap(self.swapped[-1])
                continue
            self.swapped.popleft()
            self.running.append(req)
            out.append(plan)
        return budget

    def _with_swaps(self, out: SchedulerOutput, swapped_in: list[SwapPlan]) -> SchedulerOutput:
        """The step's swap plans; ``preempted`` keeps only the recomputed victims."""
        swapped_out, self._swap_outs = self._swap_outs, []
        unswapped, self._unswapped = self._unswapped, []
        swapped_ids = {id(p.req) for p in swapped_out}
        return replace(
            out,
            preempted=[r for r in out.preempted if id(r) not in swapped_ids],
            swapped_out=swapped_out,
            swapped_in=swapped_in,
            unswapped=unswapped,
        )

    def _unswap(self, req: Request) -> None:
        """A swapped request drops its host copy and slot and waits to be recomputed."""
        assert self.swap is not None
        self.swapped.remove(req)
        self.swap.drop(req)
        self.swap.decisions.dropped += 1
        self.kv.release(req.rid)
        self.waiting.appendleft(req)
        self._unswapped.append(req)

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
        if self.admission is None or not self.kv.has_free_slot():
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

    def _premap_waiting(self) -> None:
        """Map, during this step, the slots that the next step's admissions will take:
        a prompt's chunks are otherwise mapped in the very step that needs them."""
        # Every idle slot, not only the free seats: with every seat taken, the spare
        # slots (``engine/kv_setup.spare_slots``) are mapped ahead for those next in line.
        seats = max(self.config.max_num_seqs - len(self.running), len(self.kv.idle_slots()))
        heads = list(itertools.islice(self.waiting, max(0, seats)))
        wanted, hits = self._next_admissions(heads)
        if not wanted:
            return
        geo = self.kv.geometry
        fresh = sum(max(0, geo.chunks_for(t) - len(h.chunks)) for t, h in zip(wanted, hits))
        self.kv.evict_to_free(len(self.running) + fresh, keep=hits)
        self.kv.premap(wanted, headroom_chunks=len(self.running), hits=hits)

    def _next_admissions(self, heads: list[Request]) -> tuple[list[int], list[PrefixMatch]]:
        """The tokens each of ``heads`` would map if admitted next step (within one
        step's token budget), and its cache hit now."""
        budget = self.config.max_num_batched_tokens
        wanted: list[int] = []
        hits: list[PrefixMatch] = []
        for req in heads:
            if budget <= 0:
                break
            hit = self.kv.match(req.token_ids, req.num_tokens - 1)
            n = min(req.num_tokens - hit.tokens, budget)  # computed from the end of the hit
            wanted.append(hit.tokens + n)
            hits.append(hit)
            budget -= n
        return wanted, hits

    def _map_ahead(self, spans: list[ScheduledSpan]) -> None:
        """Map what the next steps will write (never preempts). A pool the cache has
        filled gives those chunks by eviction: done now, while the GPU computes, so the
        step that writes them does not evict and remap (the same blocks would go then:
        least recently used first)."""
        ahead = self.config.lookahead_tokens
        geo = self.kv.geometry
        targets = []
        for sp in spans:
            remaining = sp.req.num_tokens - sp.end
            target = sp.end + (min(remaining, sp.num_tokens) if remaining else ahead)
            targets.append((sp.req.rid, min(target, sp.req.max_len)))
        need = sum(max(0, geo.chunks_for(t) - self.kv.mapped_chunks(r)) for r, t in targets)
        self.kv.evict_to_free(need)
        for rid, target in targets:
            self.kv.grow(rid, target, steal=False)
